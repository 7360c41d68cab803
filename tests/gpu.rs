//! GPU against CPU on every fixture (both manifests; f16/bf16 BAT also with `--rounding once`; the
//! BAT cases of PEFT's merges on an AMD processor also with `--bat-sums amd`), when this machine
//! has a usable GPU (`--device cuda`): the same
//! bytes (BAT too: the GPU's GEMM kernel sums in the CPU's order); with `BONE_TOOL_GEMM=cublas`,
//! every value within one unit in the last place (in f32 BAT, within 2^-18 of the tensor's largest
//! value: `Float::disagreement`). Without a GPU the test says so on stderr: it then
//! checks only that `--device cuda` fails cleanly. (On the GPU machine, scripts/gpu-check.sh runs
//! the same comparison through examples/gpu_check.rs, without cargo.)

mod common;
use bone_tool::ops::dtype::Float;
use common::*;

#[test]
fn cuda_matches_cpu_on_every_fixture_or_says_why_not() {
    let probe = run(&[
        "-q",
        "merge",
        "--base",
        fixtures().join("bases/llama-bf16").to_str().unwrap(),
        "--adapter",
        fixtures().join("cases/bone-bat-bf16/adapter").to_str().unwrap(),
        "--out",
        tempfile::tempdir().unwrap().path().join("o").to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    if !probe.status.success() {
        let err = stderr(&probe);
        assert_eq!(probe.status.code(), Some(2), "{err}");
        assert!(err.starts_with("error: --device cuda: no usable GPU: "), "{err}");
        not_checked(&format!("no GPU on this machine, CPU/GPU comparison not run: {}", err.trim()));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
    let exact = std::env::var("BONE_TOOL_GEMM").as_deref() != Ok("cublas");
    // PEFT 0.18.1's cases (the f16/bf16 BAT ones also merged with --rounding once, the GPU's other
    // BAT rounding; those PEFT merged otherwise on an AMD processor, and the AMD-only wide case,
    // also with --bat-sums amd, the GEMM kernel's other sums), and PEFT 0.21.2's on transformers 5
    // (merged with --rounding once)
    let cases = manifests().into_iter().flat_map(|(m, folder)| {
        let once = m["rounding"] == "once";
        let cases = m["cases"].as_array().unwrap().clone().into_iter().map(|c| (c, false));
        let amd_only = m["amd"].as_array().cloned().unwrap_or_default().into_iter().map(|c| (c, true));
        cases.chain(amd_only).flat_map(move |(c, amd_only)| {
            let also_once = !once && c["merged_safe"].is_string();
            let runs = [("merge", once, false), ("unmerge", false, false)]
                .into_iter()
                .filter(|_| !amd_only)
                .chain(also_once.then_some(("merge", true, false)))
                .chain(c["merged_amd"].is_string().then_some(("merge", false, true)))
                .chain(c["merged_safe_amd"].is_string().then_some(("merge", true, true)));
            runs.map(move |(cmd, once, amd)| (c.clone(), folder, cmd, once, amd)).collect::<Vec<_>>()
        })
    });
    let mut amd_runs = 0;
    for (c, folder, cmd, once, amd) in cases {
        let name = c["name"].as_str().unwrap();
        let model = if cmd == "merge" {
            fixtures().join(c["base"].as_str().unwrap())
        } else {
            fixtures().join(folder).join(name).join("merged")
        };
        let mut outs = vec![];
        for device in ["cpu", "cuda"] {
            let out = tmp.path().join(format!("{name}-{cmd}-{device}-{once}-{amd}"));
            let mut args: Vec<String> = vec!["-q".into(), cmd.into()];
            args.push(if cmd == "merge" { "--base" } else { "--merged" }.into());
            args.push(model.display().to_string());
            for a in c["adapters"].as_array().unwrap() {
                args.extend(["--adapter".into(), fixtures().join(a.as_str().unwrap()).display().to_string()]);
            }
            args.extend(["--out".into(), out.display().to_string(), "--device".into(), device.into()]);
            if device == "cuda" {
                args.push("--all-on-gpu".into()); // else the CPU computes the adds while it starts
            }
            if c["autocast_adapter_dtype"] == false {
                args.push("--no-autocast-adapter-dtype".into());
            }
            if once {
                args.extend(["--rounding".into(), "once".into()]);
            }
            if amd {
                args.extend(["--bat-sums".into(), "amd".into()]);
            }
            ok(&run(&args.iter().map(String::as_str).collect::<Vec<_>>()));
            outs.push(load(&out));
        }
        for (t, cpu) in &outs[0] {
            let gpu = &outs[1][t];
            let f = Float::from_dtype(cpu.dtype).expect("every fixture tensor is a float");
            if let Some((k, x, y)) = f.disagreement_in(&cpu.data, &gpu.data) {
                panic!("{name} {cmd} (once: {once}, amd: {amd}) {t}: element {k}: CPU {x} vs GPU {y}");
            }
            assert!(!exact || cpu.data == gpu.data, "{name} {cmd} (once: {once}, amd: {amd}) {t}: not the CPU's bytes");
            compared += 1;
        }
        amd_runs += usize::from(amd);
    }
    assert!(compared > 500 && amd_runs == 8, "{compared} tensors, {amd_runs} runs with --bat-sums amd");
}
