//! `moe`: run, inspect, check and benchmark MoE blocks.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_gpu;
mod check;
mod checkpoint_run;
mod ep;
mod eplb_cmd;
mod info;
mod quant_cmd;
mod run;

/// The MoE layer runtime: router, experts, combine, on CPUs and NVIDIA GPUs.
#[derive(Debug, Parser)]
#[command(name = "moe", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one MoE block (the embedded default, or a layer of a checkpoint) and time it.
    Run(Box<run::RunArgs>),
    /// Show the machine, the registered backends and the generated capability table.
    Info(info::InfoArgs),
    /// Check every available backend against `reference` on fresh random inputs.
    Check(check::CheckArgs),
    /// Plan expert load balancing (EPLB) for a routing trace or a synthetic skew; plot per-rank load.
    Eplb(eplb_cmd::EplbArgs),
    /// Benchmark a backend over standard shapes and token counts against the machine's floor.
    Bench(bench::BenchArgs),
}

/// Rust starts programs with SIGPIPE ignored, so a print into a closed pipe (`moe info | head`)
/// panics; a command-line tool should end quietly instead, as `cat` does.
#[cfg(unix)]
fn default_sigpipe() {
    // SAFETY: sets the default disposition of one signal, before any thread exists; no handler
    // code runs in this process because of it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    default_sigpipe();
    // Linux grants AMX tile state per process and refuses once threads with small signal
    // stacks exist (CUDA's, say): ask before anything starts a thread.
    let _ = moe_cpu::kernels::amx_available();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("MOE_LOG"))
        .with_writer(std::io::stderr)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(*a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Eplb(a) => eplb_cmd::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
