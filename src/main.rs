use bone_tool::cli::Cli;
use bone_tool::error::{exit_code, one_line};
use clap::Parser;

fn main() {
    let mut cli = Cli::parse();
    bone_tool::report::set_color(cli.color);
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            bone_tool::report::error(&format!("cannot start {n} threads: {e}"));
            std::process::exit(bone_tool::error::exit::FAILED);
        }
    }
    // Parallelism lives in bone-tool's own loops; faer's small solves run single-threaded inside them.
    faer::set_global_parallelism(faer::Par::Seq);
    let _ = ctrlc::set_handler(bone_tool::execute::request_interrupt);
    if let Err(e) = bone_tool::commands::run(&mut cli) {
        // `bone-tool man | head`: a reader that stops early is not an error.
        let broken_pipe = e
            .chain()
            .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe));
        if broken_pipe {
            std::process::exit(0);
        }
        bone_tool::report::error(&one_line(&e));
        std::process::exit(exit_code(&e));
    }
}
