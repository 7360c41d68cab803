//! Compile the GPU kernels with NVRTC on any machine: NVRTC needs no GPU and no driver. Checks the
//! step of `--device cuda` that no test here can reach otherwise (the kernel source as NVRTC reads
//! it, the inline PTX included), and writes the PTX for `ptxas` to assemble for a real GPU.
//!
//!   nvrtc_check OUT.ptx
//!
//! scripts/nvrtc-check.sh installs NVRTC and ptxas from PyPI (the CUDA version of the GPU machine)
//! and runs this. Exit 0: compiled, every kernel present. Exit 1: NVRTC refused the source (its log
//! is printed). Exit 2: no libnvrtc on the library path.

use bone_tool::backend::cuda::{Kernel, KERNELS};

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: nvrtc_check OUT.ptx");
        std::process::exit(2);
    };
    // SAFETY: only tries to open the shared library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("no libnvrtc on the library path (scripts/nvrtc-check.sh installs one)");
        std::process::exit(2);
    }
    // the same call as Cuda::new
    let ptx = match cudarc::nvrtc::compile_ptx(KERNELS) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("NVRTC refused the kernels: {e:?}");
            std::process::exit(1);
        }
    };
    let src = ptx.to_src();
    let mut missing = vec![];
    for k in Kernel::ALL {
        if !src.contains(&format!(".entry {}(", k.name())) {
            missing.push(k.name());
        }
    }
    let target = src.lines().find(|l| l.starts_with(".target")).unwrap_or("(no .target line)");
    let version = src.lines().find(|l| l.starts_with(".version")).unwrap_or("(no .version line)");
    std::fs::write(&out, &src).expect("write the PTX");
    println!("NVRTC compiled the kernels: {} bytes of PTX, {version}, {target}, written to {out}", src.len());
    if !missing.is_empty() {
        eprintln!("kernels missing from the PTX: {}", missing.join(", "));
        std::process::exit(1);
    }
    println!("all {} kernels present", Kernel::ALL.len());
}
