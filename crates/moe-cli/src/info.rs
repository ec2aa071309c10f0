//! `moe info`.

use std::process::ExitCode;

use clap::Args;
use moe_runtime::{default_registry, probe_hardware};

/// Arguments of `moe info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print only the capability table (Markdown), e.g. to regenerate docs/capabilities.md.
    #[arg(long)]
    pub table_only: bool,
}

/// Prints machine facts, the backends and the capability table.
pub fn run(args: InfoArgs) -> moe_core::Result<ExitCode> {
    let hw = probe_hardware();
    let registry = default_registry();
    if args.table_only {
        print!("{}", registry.capability_table(&hw));
        return Ok(ExitCode::SUCCESS);
    }
    println!("machine");
    println!("  cpu threads : {}", hw.cpu_threads);
    println!("  cpu features: {}", if hw.cpu_features.is_empty() { "-".into() } else { hw.cpu_features.join(" ") });
    match moe_cpu::kernels::amx_status() {
        Ok(()) => println!("  cpu amx     : AMX-BF16 tiles for row tiles of {}+ rows", moe_cpu::tuning::amx_rows()),
        Err(why) => println!("  cpu amx     : not used ({why})"),
    }
    if moe_cpu::pool::use_team() {
        println!(
            "  cpu pool    : worker team, polls {} us for the next step before sleeping (MOE_CPU_SPIN_US; MOE_CPU_POOL=rayon for rayon's pool)",
            moe_cpu::pool::spin_us()
        );
    } else {
        println!("  cpu pool    : rayon (MOE_CPU_POOL=rayon)");
    }
    if hw.gpus.is_empty() {
        println!("  gpus        : none ({})", hw.gpu_unavailable.as_deref().unwrap_or("no reason recorded"));
    }
    for g in &hw.gpus {
        println!(
            "  gpu {}       : {} (sm_{}{}, {:.1} GiB)",
            g.ordinal,
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            g.memory_bytes as f64 / (1u64 << 30) as f64
        );
    }
    for line in moe_runtime::runtime_notes(&hw) {
        println!("  {line}");
    }
    println!("\nbackends (auto picks the highest priority that can implement the problem)");
    for p in registry.providers() {
        println!(
            "  {:<10} priority {:>4}{}  {}",
            p.name(),
            p.priority(),
            if p.opt_in() { " (opt-in)" } else { "" },
            p.description()
        );
    }
    println!("\ncapability table (generated from each backend's can_implement on this machine)\n");
    print!("{}", registry.capability_table(&hw));
    Ok(ExitCode::SUCCESS)
}
