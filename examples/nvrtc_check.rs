//! Compile the GPU kernels with NVRTC on any machine: NVRTC needs no GPU and no driver. Checks the
//! step of `--device cuda` that no test here can reach otherwise (the kernel source as NVRTC reads
//! it, the inline PTX included), and writes the PTX for `ptxas` to assemble for a real GPU.
//!
//!   nvrtc_check OUT.ptx
//!
//! scripts/nvrtc-check.sh installs NVRTC and ptxas from PyPI (the CUDA version of the GPU machine)
//! and runs this. Exit 0: compiled, every kernel present. Exit 1: NVRTC refused the source (its log
//! is printed). Exit 2: no libnvrtc on the library path.

use bone_tool::backend::cuda::{library, Kernel, Library, KERNELS};
use bone_tool::backend::kernel_cache;

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!("usage: nvrtc_check OUT.ptx");
        std::process::exit(2);
    };
    // loading the library, timed apart from the compile
    let t = std::time::Instant::now();
    if !library(Library::Nvrtc) {
        eprintln!("no libnvrtc on the library path (scripts/nvrtc-check.sh installs one)");
        std::process::exit(2);
    }
    let load = t.elapsed();
    // the same calls as Cuda::new; the first one makes cudarc load the library its own way, which
    // costs nothing when `library` kept it loaded (a full load again if it had not)
    let t = std::time::Instant::now();
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; libnvrtc is loaded.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let cudarc_load = t.elapsed();
    let t = std::time::Instant::now();
    let compiled = cudarc::nvrtc::compile_ptx(KERNELS);
    let compile = t.elapsed();
    let ptx = match compiled {
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
    println!(
        "NVRTC {major}.{minor}: loading it took {:.0} ms (cudarc's own load after it {:.1} ms), compiling {:.0} ms",
        load.as_secs_f64() * 1e3,
        cudarc_load.as_secs_f64() * 1e3,
        compile.as_secs_f64() * 1e3
    );
    if !missing.is_empty() {
        eprintln!("kernels missing from the PTX: {}", missing.join(", "));
        std::process::exit(1);
    }
    println!("all {} kernels present", Kernel::ALL.len());

    // the PTX cache --device cuda uses, with this NVRTC: compiled once, then read back the same
    let tmp = std::env::temp_dir().join(format!("bone-tool-nvrtc-check-{}", std::process::id()));
    let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
    let compile = || cudarc::nvrtc::compile_ptx(KERNELS).map(|p| p.to_src()).map_err(|e| anyhow::anyhow!("{e:?}"));
    let t = std::time::Instant::now();
    let first = kernel_cache::ptx(Some(&tmp), KERNELS, (major, minor), &names, compile).expect("compile");
    let t_first = t.elapsed();
    let t = std::time::Instant::now();
    let second = kernel_cache::ptx(Some(&tmp), KERNELS, (major, minor), &names, compile).expect("cache");
    let t_second = t.elapsed();
    let _ = std::fs::remove_dir_all(&tmp);
    if first.from_cache || !second.from_cache || first.text != second.text || first.text != src {
        eprintln!("the kernel cache did not give back what NVRTC compiled");
        std::process::exit(1);
    }
    println!(
        "kernel cache: compiled and stored in {:.0} ms, read back the same PTX in {:.1} ms",
        t_first.as_secs_f64() * 1e3,
        t_second.as_secs_f64() * 1e3
    );
}
