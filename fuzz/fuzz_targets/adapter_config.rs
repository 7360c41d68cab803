//! Any text as adapter_config.json: parsing either fails with a message or gives a config whose
//! r and mini_r are positive, and whose targeting (PEFT's rules, regexes included) answers for
//! any module path without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut warnings = vec![];
        let path = std::path::Path::new("adapter_config.json");
        if let Ok(c) = bone_tool::adapter::AdapterConfig::parse(path, text, &mut warnings) {
            assert!(c.r > 0 && c.mini_r > 0);
            for m in ["model.layers.0.self_attn.q_proj", "lm_head", "transformer.h.12.mlp.c_fc", "", "a..b.1."] {
                let _ = c.peft_targets(m);
            }
        } else {
            assert!(warnings.len() < 1 << 20);
        }
    }
});
