//! How bone-tool talks to people on stderr: `error: …` and `warning: …`, one line each, in colour
//! only when stderr is a terminal (and `NO_COLOR` is unset), or as `--color` says.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};

/// `--color`: when to colour the `error:` / `warning:` labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// When stderr is a terminal and NO_COLOR is not set
    Auto,
    Always,
    Never,
}

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static COLOR: AtomicU8 = AtomicU8::new(UNSET);

/// Decide once, at start-up.
pub fn set_color(choice: ColorChoice) {
    let on = match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => auto(),
    };
    COLOR.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

fn colored() -> bool {
    match COLOR.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => auto(),
    }
}

fn auto() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The label, coloured when colour is on: red for errors, yellow for warnings (bold).
fn label(name: &str, ansi: &str) -> String {
    if colored() {
        format!("\x1b[1;{ansi}m{name}:\x1b[0m")
    } else {
        format!("{name}:")
    }
}

/// `error: MESSAGE` on stderr (the message is one line).
pub fn error(msg: &str) {
    eprintln!("{} {}", label("error", "31"), msg.replace('\n', " "));
}

/// `warning: MESSAGE` on stderr.
pub fn warning(msg: &str) {
    eprintln!("{} {}", label("warning", "33"), msg.replace('\n', " "));
}
