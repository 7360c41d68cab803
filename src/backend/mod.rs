//! Where the math runs: the CPU (rayon, always there) or an NVIDIA GPU (feature `cuda`). Both run
//! the same op chains ([`crate::ops::Prepared`]); the pipeline does not care which.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_on_host;
#[cfg(feature = "cuda")]
pub mod kernel_cache;

use crate::error::{input, Result};
use crate::ops::dtype::Float;
use crate::ops::{self, Prepared, Rounding};

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when a usable GPU is there, else the CPU
    Auto,
    Cpu,
    Cuda,
}

/// What the work will ask of a device: whether it has GEMMs (BAT: the self-check runs them) and which
/// weight dtypes it computes in (the self-check checks those).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Needs {
    pub gemm: bool,
    pub dtypes: Vec<Float>,
}

impl Needs {
    /// Everything: GEMMs and every float dtype.
    pub fn all() -> Needs {
        Needs { gemm: true, dtypes: vec![Float::F32, Float::F16, Float::BF16] }
    }

    /// Add what `other` needs.
    pub fn include(&mut self, other: Needs) {
        self.gemm |= other.gemm;
        for d in other.dtypes {
            self.include_dtype(d);
        }
    }

    /// Add dtype `d`, once.
    pub fn include_dtype(&mut self, d: Float) {
        if !self.dtypes.contains(&d) {
            self.dtypes.push(d);
        }
    }
}

/// A chain started with [`Device::start`].
#[derive(Debug)]
pub enum Ticket {
    /// Computed already; the first value that became non-finite, if checked and any.
    Done(Option<usize>),
    /// Queued on this GPU lane.
    #[cfg(feature = "cuda")]
    Lane(usize),
}

pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::Cuda>),
}

/// A device being opened on its own thread, so that the work need not wait for it: a GPU takes
/// 0.4-0.6 s to start (driver, context, kernels, lanes, self-check), in which the pipeline can
/// already copy untouched tensors and the CPU compute the chains whose bytes are the same on both
/// ([`same_bytes_on_every_device`]).
#[derive(Default)]
pub struct Opening {
    opened: std::sync::OnceLock<Opened>,
    /// Held while `opened` is set and while a waiter checks it, so that no wake-up is missed.
    lock: std::sync::Mutex<()>,
    ready: std::sync::Condvar,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What opening a device gave: the device and a note for the user, or the error (its message, and
/// whether it was the user's input: see [`crate::error::InputError`]).
type Opened = std::result::Result<(Device, Option<String>), (String, bool)>;

impl Opening {
    /// Open the device asked for ([`Device::select_for`]): on a thread when that can take a while
    /// (an NVIDIA device node is there: even finding out whether the driver library loads costs
    /// 10-50 ms then), else at once, so that a machine without a GPU fails before any work.
    pub fn start(choice: DeviceChoice, needs: Needs) -> std::sync::Arc<Opening> {
        let opening = std::sync::Arc::new(Opening::default());
        // BONE_TOOL_OPEN_DELAY_MS=N: open on a thread, N ms late, whatever the device (the tests run
        // the pipeline's paths for a device still opening on machines without a GPU).
        let delay = crate::env_setting::<u64>("BONE_TOOL_OPEN_DELAY_MS");
        if delay.is_none() && (choice == DeviceChoice::Cpu || !Device::device_node()) {
            opening.set(Device::select_for(choice, &needs));
        } else {
            let o = opening.clone();
            let handle = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(delay.unwrap_or(0)));
                let opened = std::panic::catch_unwind(|| Device::select_for(choice, &needs))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: opening the device panicked")));
                o.set(opened)
            });
            *opening.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        }
        opening
    }

    /// A device opened already.
    pub fn ready(device: Device) -> Opening {
        let opening = Opening::default();
        let _ = opening.opened.set(Ok((device, None)));
        opening
    }

    fn set(&self, result: Result<(Device, Option<String>)>) {
        let result = result.map_err(|e| {
            let is_input = e.chain().any(|c| c.is::<crate::error::InputError>());
            (format!("{e:#}"), is_input)
        });
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.opened.set(result);
        self.ready.notify_all();
    }

    /// The device, if it is open (an error if it could not be opened); None while it is opening.
    pub fn get(&self) -> Option<Result<&Device>> {
        self.opened.get().map(|o| o.as_ref().map(|(d, _)| d).map_err(Self::error))
    }

    /// The device, once it is open.
    pub fn wait(&self) -> Result<&Device> {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.opened.get().is_none() {
            guard = self.ready.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        drop(guard);
        self.get().expect("waited until set")
    }

    /// Wait for the opening thread to end (a thread left inside the driver while the process exits
    /// could crash it): the device, or why it could not be opened.
    pub fn finish(&self) -> Result<&Device> {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join(); // a panic was caught and set as the error
        }
        self.wait()
    }

    /// Why `auto` chose the CPU on a machine with a GPU driver, once known.
    pub fn note(&self) -> Option<&str> {
        self.opened.get().and_then(|o| o.as_ref().ok()).and_then(|(_, note)| note.as_deref())
    }

    fn error((msg, is_input): &(String, bool)) -> anyhow::Error {
        if *is_input {
            input(msg.clone())
        } else {
            anyhow::anyhow!("{msg}")
        }
    }
}

/// True when a chain has GEMMs (BAT).
pub fn has_gemm(chain: &[Prepared]) -> bool {
    chain.iter().any(|op| !matches!(op, Prepared::Periodic { .. }))
}

/// True when a chain gives the same bytes on the CPU and on a GPU, on a weight of `i` columns. The elementwise adds (default
/// and mini) do: f32 with one rounding each, in the same order. BAT does where its GEMMs sum in
/// the same order on both: the GPU's `strip_gemm` kernel sums each element's products in order
/// (one fused multiply-add each from [`ops::BatSums::fused_from`], as PEFT's torch does; a rounded
/// product and a rounded add below; in the op's blocks of k), and so does the CPU's GEMM where [`ops::gemm_is_in_order`] finds it for that r
/// (always below r = 8, where it is the in-order loop; faer on processors with FMA, from r = 385
/// in torch's blocks of at most 384); with
/// `BONE_TOOL_GEMM=cublas`, cuBLAS sums in its own order. The pipeline computes these chains on
/// the CPU while a GPU is starting, and the self-check holds a GPU to the CPU's bytes on them.
pub fn same_bytes_on_every_device(chain: &[Prepared], i: usize) -> bool {
    chain.iter().all(|op| match op {
        Prepared::Periodic { .. } => true,
        Prepared::BatMerge { r, rounding, .. } | Prepared::BatUnmerge { r, rounding, .. } => {
            gpu_gemm_in_order() && ops::gemm_is_in_order(*r, rounding.sums) && !op.cpu_only(i)
        }
    })
}

/// True when only the CPU computes a chain as PEFT does on a weight of `i` columns
/// ([`Prepared::cpu_only`]: BAT with the AMD processor's sums at r = 9 to 11, and its unmerge at
/// r = 8 to 11 on a weight of one block row or column, whose sums the GPU's kernel does not model).
/// The pipeline gives such chains to the CPU even where a GPU is open.
pub fn cpu_only(chain: &[Prepared], i: usize) -> bool {
    chain.iter().any(|op| op.cpu_only(i))
}

/// Whether a GPU would sum BAT's GEMMs in order ([`cuda::StripGemm::InOrder`]).
fn gpu_gemm_in_order() -> bool {
    #[cfg(feature = "cuda")]
    {
        cuda::StripGemm::configured() == cuda::StripGemm::InOrder
    }
    #[cfg(not(feature = "cuda"))]
    {
        true // no GPU: the CPU is every device
    }
}

impl Device {
    /// Open the device asked for. `auto` falls back to the CPU, with the reason as a note when
    /// the machine has a GPU driver (a GPU that cannot be used deserves a word; a machine without
    /// one does not); `cuda` without a usable GPU is an error.
    pub fn select(choice: DeviceChoice) -> Result<(Device, Option<String>)> {
        Self::select_for(choice, &Needs::all())
    }

    /// [`Device::select`] for the work described by `needs`: a GPU opens cuBLAS only for GEMMs
    /// that cuBLAS is to do (`BONE_TOOL_GEMM=cublas`), and self-checks only the kinds of op and the
    /// dtypes the work has.
    pub fn select_for(choice: DeviceChoice, needs: &Needs) -> Result<(Device, Option<String>)> {
        match choice {
            DeviceChoice::Cpu => Ok((Device::Cpu, None)),
            DeviceChoice::Cuda => Self::open_cuda(needs)
                .map(|d| (d, None))
                .map_err(|why| input(format!("--device cuda: no usable GPU: {why} (use --device cpu or auto)"))),
            DeviceChoice::Auto => match Self::open_cuda(needs) {
                Ok(d) => Ok((d, None)),
                Err(why) if Self::no_driver() => {
                    let _ = why;
                    Ok((Device::Cpu, None))
                }
                Err(why) => Ok((Device::Cpu, Some(format!("using the CPU: {why}")))),
            },
        }
    }

    /// True when this machine shows an NVIDIA device to this process: /dev/nvidiactl, or WSL's
    /// /dev/dxg. Without either no GPU can open; finding that out costs a `stat`, not a `dlopen`.
    /// Windows has no such node: there the driver is always asked (on a thread).
    fn device_node() -> bool {
        cfg!(feature = "cuda")
            && (cfg!(windows) || ["/dev/nvidiactl", "/dev/dxg"].iter().any(|p| std::path::Path::new(p).exists()))
    }

    /// True when this machine has no NVIDIA driver at all.
    fn no_driver() -> bool {
        #[cfg(feature = "cuda")]
        {
            !cuda::library(cuda::Library::Driver)
        }
        #[cfg(not(feature = "cuda"))]
        {
            true
        }
    }

    #[cfg(feature = "cuda")]
    fn open_cuda(needs: &Needs) -> std::result::Result<Device, String> {
        let cublas = needs.gemm && cuda::StripGemm::configured() == cuda::StripGemm::Cublas;
        let gpu = cuda::Cuda::new(cublas).map_err(|e| format!("{e:#}"))?;
        let mut dev = Device::Cuda(Box::new(gpu));
        let t = std::time::Instant::now();
        dev.self_check(needs).map_err(|e| format!("the GPU's results differ from the CPU's ({e}); not using it"))?;
        if let Device::Cuda(g) = &mut dev {
            g.startup.push(("self-check", t.elapsed().as_secs_f64()));
        }
        Ok(dev)
    }

    #[cfg(not(feature = "cuda"))]
    fn open_cuda(_needs: &Needs) -> std::result::Result<Device, String> {
        Err("this bone-tool was built without the `cuda` feature".to_string())
    }

    /// Free a GPU once the work needs it no more, on a thread of its own (see
    /// [`cuda::Cuda::release`]); nothing on the CPU. Only its name and counters are used afterwards.
    pub fn release(&self) {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(g) = self {
            g.release();
        }
    }

    /// Seconds so far in host-to-device copies, kernels, device-to-host copies, the host's copies
    /// into and out of page-locked buffers, and the host waiting for results (None on the CPU).
    pub fn gpu_phases(&self) -> Option<[f64; 5]> {
        match self {
            Device::Cpu => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => Some(g.phase_seconds()),
        }
    }

    /// How long each step of starting the device took, in seconds (empty on the CPU).
    pub fn startup(&self) -> Vec<(&'static str, f64)> {
        match self {
            Device::Cpu => vec![],
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g.startup.clone(),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => format!("cuda ({})", g.name()),
        }
    }

    /// Run a chain over rows `row0..row0 + rows` (see [`ops::apply_chain`]); with `check_finite`,
    /// returns the first value that became inf or NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_chain(
        &self,
        src: &[u8],
        dst: &mut [u8],
        d: Float,
        rows: usize,
        i: usize,
        row0: usize,
        chain: &[Prepared],
        check_finite: bool,
    ) -> Result<Option<usize>> {
        match self {
            Device::Cpu => Ok(ops::apply_chain(src, dst, d, rows, i, row0, chain, check_finite)),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => {
                g.apply_chain(src, dst, d, rows, i, row0, chain)?;
                Ok(if check_finite { d.first_new_non_finite(src, dst) } else { None })
            }
        }
    }

    /// How many pieces may be in flight at once: 1 on the CPU (it computes as a piece starts); on a
    /// GPU one per lane (stream), so that copies and kernels of consecutive pieces overlap.
    /// (`BONE_TOOL_CPU_IN_FLIGHT=N` keeps N pieces in flight on the CPU too: the tests use it to
    /// check that pieces land in order with the GPU's queueing.)
    pub fn lanes(&self) -> usize {
        match self {
            Device::Cpu => {
                static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
                *N.get_or_init(|| crate::env_setting("BONE_TOOL_CPU_IN_FLIGHT").unwrap_or(1).max(1))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g.lanes(),
        }
    }

    /// Start a chain over rows `row0..row0 + rows`: the CPU computes it into `dst` now; a GPU with
    /// several lanes queues it and fills `dst` in [`Device::finish`]. Pieces must be finished in
    /// the order they were started, at most [`Device::lanes`] in flight.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        src: &[u8],
        dst: &mut [u8],
        d: Float,
        rows: usize,
        i: usize,
        row0: usize,
        chain: &[Prepared],
        check_finite: bool,
    ) -> Result<Ticket> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(g) if g.lanes() > 1 => Ok(Ticket::Lane(g.enqueue(src, d, rows, i, row0, chain)?)),
            _ => self.apply_chain(src, dst, d, rows, i, row0, chain, check_finite).map(Ticket::Done),
        }
    }

    /// Wait for a started chain: its result is in `dst`; with `check_finite`, returns the first
    /// value that became inf or NaN.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn finish(&self, t: Ticket, src: &[u8], dst: &mut [u8], d: Float, check_finite: bool) -> Result<Option<usize>> {
        match (self, t) {
            (_, Ticket::Done(k)) => Ok(k),
            #[cfg(feature = "cuda")]
            (Device::Cuda(g), Ticket::Lane(lane)) => g.collect(lane, src, dst, d, check_finite),
            #[cfg(feature = "cuda")]
            (Device::Cpu, Ticket::Lane(_)) => unreachable!("the CPU finishes as it starts"),
        }
    }

    /// Run each kind of op the work has (without GEMMs, the adds only), in each of its dtypes (or
    /// f32 when it computes nothing), on a small random problem and compare with the CPU: a device
    /// is not used whose results differ from the CPU's bytes on a chain that
    /// [`same_bytes_on_every_device`], or by more than one unit in the last place on another.
    pub fn self_check(&self, needs: &Needs) -> std::result::Result<(), String> {
        let (o, i, r) = (48usize, 40usize, 8usize);
        let mut g = ops::Xorshift(0x2545F4914F6CDD1D);
        // Weights at least 0.1 from zero and deltas below 0.06: no result cancels into a smaller
        // binade than its delta, so a summation order that flips a rounded delta moves the result
        // by at most one unit (see Float::disagreement).
        let w: Vec<f32> = g.values(o * i, 0.2).into_iter().map(|x| x + 0.1f32.copysign(x)).collect();
        let b_def = g.values(r * o, 0.02);
        let b_bat = g.values(o * r, 0.04);
        let inv = ops::bat_inverses(&b_bat, r).map_err(|_| "self-check block singular".to_string())?.inv;
        let dtypes = if needs.dtypes.is_empty() { vec![Float::F32] } else { needs.dtypes.clone() };
        for d in dtypes {
            let rd = Rounding::peft(d);
            let chains = [
                vec![Prepared::Periodic { et: ops::expand_transposed(&b_def, r, o, o), r, sign: 1.0, rounding: rd }],
                vec![Prepared::BatMerge { b: b_bat.clone(), r, rounding: rd }],
                vec![
                    Prepared::BatMerge { b: b_bat.clone(), r, rounding: rd },
                    Prepared::BatUnmerge { b: b_bat.clone(), inv: inv.clone(), r, rounding: rd, transposed: false },
                    Prepared::Periodic { et: ops::expand_transposed(&b_def, r, o, o), r, sign: -1.0, rounding: rd },
                ],
            ];
            let mut src = vec![0u8; o * i * d.size()];
            d.encode(&w, &mut src);
            for chain in chains.iter().filter(|c| needs.gemm || !has_gemm(c)) {
                let mut cpu = vec![0u8; src.len()];
                ops::apply_chain(&src, &mut cpu, d, o, i, 0, chain, false);
                // The path the pipeline takes (start, finish): with lanes, two pieces in flight at
                // once; with one lane, the synchronous path, which start takes then.
                let mut results = vec![vec![0u8; src.len()]; 2];
                let err = |e: anyhow::Error| format!("{e:#}");
                let t1 = self.start(&src, &mut results[0], d, o, i, 0, chain, false).map_err(err)?;
                if self.lanes() > 1 {
                    let t2 = self.start(&src, &mut results[1], d, o, i, 0, chain, false).map_err(err)?;
                    self.finish(t1, &src, &mut results[0], d, false).map_err(err)?;
                    self.finish(t2, &src, &mut results[1], d, false).map_err(err)?;
                } else {
                    self.finish(t1, &src, &mut results[0], d, false).map_err(err)?;
                    results[1] = results[0].clone();
                }
                let paths = if self.lanes() > 1 { ["first lane", "second lane"] } else { ["synchronous"; 2] };
                let exact = same_bytes_on_every_device(chain, i);
                for (path, dev) in paths.iter().zip(&results) {
                    if let Some((k, p, q)) = d.disagreement_in(&cpu, dev) {
                        return Err(format!("{d} element {k}, {path}: CPU {p} vs device {q}"));
                    }
                    let n = d.size();
                    let differs = if exact { cpu.chunks(n).zip(dev.chunks(n)).position(|(a, b)| a != b) } else { None };
                    if let Some(k) = differs {
                        let mut v = [0f32; 2];
                        d.decode(&cpu[k * n..][..n], &mut v[..1]);
                        d.decode(&dev[k * n..][..n], &mut v[1..]);
                        let (p, q) = (v[0], v[1]);
                        return Err(format!("{d} element {k}, {path}: CPU {p:e} vs device {q:e}, not the same bytes"));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opening_device_is_waited_for_across_threads_and_keeps_its_error_kind() {
        let pending = std::sync::Arc::new(Opening::default());
        assert!(pending.get().is_none(), "nothing yet");
        let p = pending.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            p.set(Ok((Device::Cpu, Some("a note".into()))));
        });
        assert_eq!(pending.wait().unwrap().name(), "cpu");
        setter.join().unwrap();
        assert_eq!(pending.finish().unwrap().name(), "cpu");
        assert_eq!(pending.note(), Some("a note"));

        let failed = Opening::ready(Device::Cpu);
        let failed = Opening { opened: std::sync::OnceLock::new(), ..failed };
        failed.set(Err(input("--device cuda: no usable GPU: none")));
        let err = failed.get().unwrap().err().unwrap();
        assert_eq!(crate::error::exit_code(&err), crate::error::exit::BAD_INPUT, "{err}");
        assert_eq!(err.to_string(), "--device cuda: no usable GPU: none");
        let other = Opening { opened: std::sync::OnceLock::new(), ..Opening::ready(Device::Cpu) };
        other.set(Err(anyhow::anyhow!("the driver broke")));
        assert_eq!(crate::error::exit_code(&other.wait().err().unwrap()), crate::error::exit::FAILED);
    }

    #[test]
    fn the_chains_whose_gemms_sum_in_order_on_the_cpu_run_there_while_a_gpu_opens() {
        let rd = Rounding::peft(Float::BF16);
        let add = Prepared::Periodic { et: vec![0.0; 4], r: 2, sign: 1.0, rounding: rd };
        let bat = |r: usize| Prepared::BatMerge { b: vec![0.0; r * r], r, rounding: rd };
        let unmerge = |r: usize| Prepared::BatUnmerge {
            b: vec![0.0; r * r],
            inv: vec![0.0; r * r],
            r,
            rounding: rd,
            transposed: false,
        };
        // (i = 1024 columns: more than one block column at every r here)
        assert!(same_bytes_on_every_device(&[], 1024));
        assert!(same_bytes_on_every_device(std::slice::from_ref(&add), 1024));
        // this machine's GEMM sums in order (see ops' tests); the GPU's kernel always
        assert!(same_bytes_on_every_device(&[add.clone(), bat(2)], 1024));
        assert!(same_bytes_on_every_device(&[bat(64), unmerge(64), add.clone()], 1024));
        assert!(same_bytes_on_every_device(&[bat(8), unmerge(1024)], 1024));
        // where it does not (faer without FMA), BAT waits for the GPU, and so does a chain with it
        for r in [8, 64, 1024] {
            assert_eq!(
                same_bytes_on_every_device(&[add.clone(), bat(r)], 1024),
                ops::gemm_is_in_order(r, ops::BatSums::Intel)
            );
        }
    }

    #[test]
    fn the_chains_only_the_cpu_computes_as_peft_are_the_amd_processors_at_r_8_to_11() {
        let amd = Rounding { sums: ops::BatSums::Amd, ..Rounding::peft(Float::F32) };
        let intel = Rounding::peft(Float::F32);
        // o/r blocks of r×r
        let merge = |r: usize, o: usize, rd| Prepared::BatMerge { b: vec![0.0; o * r], r, rounding: rd };
        let unmerge = |r: usize, o: usize, rd| Prepared::BatUnmerge {
            b: vec![0.0; o * r],
            inv: vec![0.0; o * r],
            r,
            rounding: rd,
            transposed: false,
        };
        for r in 1..=16 {
            let heads = (9..=11).contains(&r);
            let dots = (8..=11).contains(&r);
            for (o, i) in [(2 * r, 3 * r), (r, 3 * r), (2 * r, r), (r, r)] {
                let single = o == r || i == r;
                let chains = [
                    (vec![merge(r, o, amd)], heads),
                    (vec![unmerge(r, o, amd)], heads || (dots && single)),
                    (vec![merge(r, o, intel), unmerge(r, o, amd)], heads || (dots && single)),
                    (vec![merge(r, o, intel), unmerge(r, o, intel)], false),
                ];
                for (chain, cpu) in chains {
                    assert_eq!(cpu_only(&chain, i), cpu, "r {r}, {o}×{i}: {chain:?}");
                    if cpu {
                        assert!(!same_bytes_on_every_device(&chain, i), "r {r}, {o}×{i}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_cpu_passes_its_own_self_check() {
        Device::Cpu.self_check(&Needs::all()).unwrap();
        Device::Cpu.self_check(&Needs { gemm: false, dtypes: vec![Float::BF16] }).unwrap();
        Device::Cpu.self_check(&Needs { gemm: true, dtypes: vec![] }).unwrap();
    }

    #[test]
    fn cpu_is_always_available_and_auto_never_fails() {
        assert_eq!(Device::select(DeviceChoice::Cpu).unwrap().0.name(), "cpu");
        let (dev, note) = Device::select(DeviceChoice::Auto).unwrap();
        if dev.name() == "cpu" && !Device::no_driver() {
            assert!(note.is_some(), "auto says why it did not use the GPU");
        }
    }

    #[test]
    fn cuda_without_a_gpu_is_one_clear_error() {
        if Device::no_driver() {
            let err = Device::select(DeviceChoice::Cuda).err().expect("no GPU here").to_string();
            assert!(err.starts_with("--device cuda: no usable GPU: "), "{err}");
            assert!(err.contains("libcuda") || err.contains("feature"), "{err}");
        } else {
            eprintln!("a GPU driver is present: this test checks the machines without one");
        }
    }
}
