//! The shared test matrix: every registered backend x family (routing/activation/shared expert)
//! x dtype x shape x token count (0, 1, odd, chunked) against `reference`. A backend that cannot
//! run a point says why through `can_implement`; that reason is printed as the skip. Every
//! backend that accepts a point must match within DESIGN.md's tolerance.

use moe_runtime::check::{check_case, default_cases, CheckOutcome};
use moe_runtime::{default_registry, probe_hardware};

#[test]
fn every_backend_matches_reference() {
    let hw = probe_hardware();
    let registry = default_registry();
    let mut failures = Vec::new();
    let (mut ran, mut skipped) = (0, 0);
    for backend in registry.names() {
        if backend == "reference" {
            continue;
        }
        for (i, case) in default_cases(false).iter().enumerate() {
            match check_case(&registry, &hw, backend, case, 1000 + i as u64) {
                o @ CheckOutcome::Ran { .. } if o.ok() => ran += 1,
                CheckOutcome::Skipped(reason) => {
                    skipped += 1;
                    eprintln!("skip {backend} {}: {reason}", case.label());
                }
                other => failures.push(format!("{backend} {}: {other:?}", case.label())),
            }
        }
    }
    eprintln!("matrix: {ran} ran within tolerance, {skipped} skipped by can_implement");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn reference_against_itself_is_exact_in_f32() {
    // Sanity of the harness: the reference compared with itself runs and is (near) exact.
    let hw = probe_hardware();
    let registry = default_registry();
    for case in default_cases(true).iter().filter(|c| c.dtype == moe_core::DType::F32) {
        match check_case(&registry, &hw, "reference", case, 5) {
            CheckOutcome::Ran { rel_err, .. } => assert!(rel_err < 1e-6, "{}: {rel_err:e}", case.label()),
            other => panic!("{}: {other:?}", case.label()),
        }
    }
}

#[test]
fn capability_table_in_docs_is_current() {
    // docs/capabilities.md is generated from can_implement on a fixed machine description so it
    // does not depend on where the test runs. Regenerate with:
    //   MOE_WRITE_CAPABILITIES=1 cargo test -p moe-runtime --test matrix capability_table
    let table = moe_runtime::capability_doc();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/capabilities.md");
    if std::env::var_os("MOE_WRITE_CAPABILITIES").is_some() {
        std::fs::write(path, &table).unwrap();
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == table,
        "docs/capabilities.md is stale; regenerate with MOE_WRITE_CAPABILITIES=1 cargo test -p moe-runtime --test matrix capability_table"
    );
}
