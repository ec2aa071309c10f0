//! `moe check`.

use std::process::ExitCode;

use clap::Args;
use moe_runtime::check::{check_case, default_cases, CheckOutcome};
use moe_runtime::{default_registry, probe_hardware};

/// Arguments of `moe check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Only these backends (comma-separated); default: every registered backend but `reference`.
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Skip the medium shape (faster).
    #[arg(long)]
    pub quick: bool,
    /// Seed for weights and inputs; default: fresh from the clock.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Runs every available backend against `reference`; non-zero exit on any miss.
pub fn run(args: CheckArgs) -> moe_core::Result<ExitCode> {
    let hw = probe_hardware();
    let registry = default_registry();
    let backends: Vec<String> = if args.backends.is_empty() {
        registry.names().into_iter().filter(|n| *n != "reference").map(String::from).collect()
    } else {
        args.backends.clone()
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("seed {seed} (rerun with --seed {seed})");
    if backends.is_empty() {
        println!("only `reference` is registered: nothing to compare");
    }
    println!("{:<10} {:<46} {:>10} {:>8}  status", "backend", "case", "rel err", "tol");
    let (mut passed, mut skipped, mut failed) = (0, 0, 0);
    for backend in &backends {
        for (i, case) in default_cases(args.quick).iter().enumerate() {
            let outcome = check_case(&registry, &hw, backend, case, seed.wrapping_add(i as u64 * 7919));
            let (err, tol, status) = match &outcome {
                CheckOutcome::Ran { rel_err, tol } => {
                    let ok = outcome.ok();
                    if ok {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                    (
                        format!("{rel_err:.2e}"),
                        format!("{tol:.0e}"),
                        if ok { "ok".to_string() } else { "MISS".to_string() },
                    )
                }
                CheckOutcome::Skipped(r) => {
                    skipped += 1;
                    ("-".into(), "-".into(), format!("skip: {r}"))
                }
                CheckOutcome::Failed(r) => {
                    failed += 1;
                    ("-".into(), "-".into(), format!("FAILED: {r}"))
                }
            };
            println!("{:<10} {:<46} {:>10} {:>8}  {}", backend, case.label(), err, tol, status);
        }
    }
    println!("check: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
