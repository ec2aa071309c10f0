//! Stand-alone GPU benchmark over the standard grid (the same measurement `moe bench --backend
//! cuda` runs), for the lent GPU machine: `gpu_bench [--out FILE] [--peer-json FILE]
//! [--shapes a,b] [--tokens 1,16] [--masked-max N] [--target-ms MS] [--graph-micro] [--quant FMT]`.

use moe_cuda::bench::{run_grid_quant, STANDARD_SHAPES, STANDARD_TOKENS};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let shapes: Vec<_> = match opt("--shapes") {
        Some(list) => STANDARD_SHAPES.iter().copied().filter(|s| list.split(',').any(|n| n == s.0)).collect(),
        None => STANDARD_SHAPES.to_vec(),
    };
    let tokens: Vec<usize> = match opt("--tokens") {
        Some(list) => list.split(',').map(|t| t.parse()).collect::<Result<_, _>>()?,
        None => STANDARD_TOKENS.to_vec(),
    };
    let masked_max = opt("--masked-max").map(|v| v.parse()).transpose()?;
    let target_ms: f64 = opt("--target-ms").map(|v| v.parse()).transpose()?.unwrap_or(200.0);
    let peer = opt("--peer-json").map(std::path::PathBuf::from);
    if args.iter().any(|a| a == "--graph-micro") {
        println!("{}", moe_cuda::bench::graph_micro(0)?);
    }
    let quant = match opt("--quant") {
        Some(q) => moe_core::QuantFormat::parse(&q)?,
        None => moe_core::QuantFormat::None,
    };
    let doc = run_grid_quant(&shapes, &tokens, peer.as_deref(), masked_max, target_ms, quant)?;
    if let Some(out) = opt("--out") {
        std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}
