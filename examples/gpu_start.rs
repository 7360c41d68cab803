//! Where a GPU's start and end go (for scripts/gpu-check.sh): opens the device as `--device cuda`
//! does for a default merge (`default`) or a BAT one (`bat`), prints each start-up step, then ends in
//! one of two ways, so that the script can time the whole process from outside:
//!
//!   gpu_start default|bat drop    drop the device (context, buffers, cuBLAS), timed, then exit
//!   gpu_start default|bat exit    exit at once, leaving the teardown to the process's exit
//!
//! If `drop` takes most of what the process's end costs, dropping the device on a thread as soon
//! as its last piece is collected would hide that cost behind the writer's tail (and fsync).
//! Exit 2 when no GPU is usable (the reason is printed).

use bone_tool::backend::{Device, DeviceChoice, Needs};
use bone_tool::ops::dtype::Float;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(end)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: gpu_start default|bat drop|exit");
        std::process::exit(2);
    };
    let needs = Needs { gemm: kind == "bat", dtypes: vec![Float::BF16] };
    let t = Instant::now();
    let device = match Device::select_for(DeviceChoice::Cuda, &needs) {
        Ok((d, _)) => d,
        Err(e) => {
            println!("no usable GPU: {e:#}");
            std::process::exit(2);
        }
    };
    let steps: Vec<String> = device.startup().iter().map(|(what, s)| format!("{what} {:.3}s", s)).collect();
    println!("{kind}: opened in {:.3}s: {}", t.elapsed().as_secs_f64(), steps.join(", "));
    if end == "drop" {
        let t = Instant::now();
        drop(device);
        println!("{kind}: dropping the device took {:.3}s", t.elapsed().as_secs_f64());
    }
    std::process::exit(0);
}
