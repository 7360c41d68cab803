//! Everyday flags: --dry-run shows the plan and writes nothing; --json gives scripts one object.

mod common;
use common::*;

#[test]
fn dry_run_lists_the_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = fixtures().join("bases/llama-bf16-sharded");
    let adapter = fixtures().join("cases/miss-default-sharded-bf16/adapter");
    let args = [
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dry-run",
    ];
    let o = run(&args);
    ok(&o);
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no temporary folder either");
    let text = stdout(&o);
    assert!(
        text.contains("lm_head.weight") && text.contains("replaced by") && text.contains("nothing written"),
        "{text}"
    );
    let mut jargs = args.to_vec();
    jargs.push("--json");
    let o = run(&jargs);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    // independent count: blocks and replacements in the adapter file
    let n = load(&adapter.join("adapter_model.safetensors")).len();
    assert_eq!(j["tensors_changed"], n);
    assert_eq!(j["changed"].as_array().unwrap().len(), n);
    assert_eq!(
        j["tensors_changed"].as_u64().unwrap() + j["tensors_copied"].as_u64().unwrap(),
        load(&base).len() as u64
    );
    assert_eq!(j["files"].as_array().unwrap().len(), 3);
    assert_eq!(j["index"], "model.safetensors.index.json");
    assert!(!out.exists());
}

#[test]
fn json_summary_after_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = fixtures().join("bases/llama-f32");
    let adapter = fixtures().join("cases/bone-default-f32/adapter");
    let o = merge_with(&base, &adapter, &out, &["-q", "--json"]);
    ok(&o);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["command"], "merge");
    assert_eq!(j["tensors_changed"], 14);
    assert_eq!(j["bytes_written"], std::fs::metadata(out.join("model.safetensors")).unwrap().len());
    assert_eq!(j["device"], "cpu");
}

#[test]
fn completions_and_man_page_come_from_the_command_line_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&["completions", shell]);
        ok(&o);
        let text = stdout(&o);
        for sub in ["merge", "unmerge", "inspect", "verify", "convert"] {
            assert!(text.contains(sub), "{shell}: {sub}");
        }
        assert!(text.contains("adapter-prefix"), "{shell}");
    }
    let o = run(&["man"]);
    ok(&o);
    let roff = stdout(&o);
    assert!(roff.contains(".TH bone-tool 1") && roff.contains("merge") && roff.contains("Exit codes"), "{roff}");
}
