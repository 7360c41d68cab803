//! Any bytes as a .safetensors file: opening either fails cleanly or yields tensors whose ranges
//! lie inside the file and can be read.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("bone-fuzz-st-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("x.safetensors");
    std::fs::write(&path, data).unwrap();
    if let Ok(f) = bone_tool::model::SafetensorsFile::open(&path) {
        for t in &f.tensors {
            assert!(t.start <= t.end && t.end <= f.len, "{t:?} beyond {}", f.len);
            if t.len_bytes() <= 1 << 16 {
                f.read_tensor(t).unwrap();
                let _ = f.read_f32(t);
            }
        }
    }
});
