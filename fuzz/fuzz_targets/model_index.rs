//! Any bytes as model.safetensors.index.json next to one valid shard: Model::open either fails
//! cleanly or every tensor it lists is found in the shard it names.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("bone-fuzz-idx-{}", std::process::id()));
    if !dir.join("a.safetensors").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}"#;
        let mut h = header.to_vec();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.extend_from_slice(&[0u8; 10]);
        std::fs::write(dir.join("a.safetensors"), bytes).unwrap();
    }
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    if let Ok(m) = bone_tool::model::Model::open(&dir) {
        let names: Vec<String> = m.tensor_names().map(str::to_string).collect();
        for n in names {
            assert!(m.tensor(&n).is_some());
        }
    }
});
