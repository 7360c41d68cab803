//! Kernel throughput on the GPU (for scripts/gpu-check.sh): the one-pass default/mini add next to a
//! device-to-device copy of the same bytes, and the BAT strip GEMMs.
//!
//! Exit 0 with the table; 2 when no GPU is usable (the reason is printed); 1 when a kernel fails.

fn main() {
    let gpu = match bone_tool::backend::cuda::Cuda::new(true) {
        Ok(g) => g,
        Err(e) => {
            println!("no usable GPU: {e:#}");
            std::process::exit(2);
        }
    };
    match gpu.bench_kernels() {
        Ok(table) => println!("{table}"),
        Err(e) => {
            println!("kernel benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}
