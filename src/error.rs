//! Errors and exit codes.
//!
//! Every error reaches the user as one line. Problems with what the user gave us (a missing
//! tensor, a bad shape, a corrupt file, an output folder that exists) are [`InputError`]s and exit
//! with code 2; failures while working (I/O, a full disk) exit with 1; an interrupt with 130.

pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// A problem with the input: the message says what, where, and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// The user pressed Ctrl-C (or the process got SIGTERM or SIGHUP).
#[derive(Debug, thiserror::Error)]
#[error("interrupted: the partial output was removed")]
pub struct Interrupted;

/// Build an input error.
pub fn input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(msg.into()))
}

/// Exit codes scripts can rely on.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const BAD_INPUT: i32 = 2;
    pub const INTERRUPTED: i32 = 130;
}

/// The exit code for an error.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.is::<Interrupted>()) {
        exit::INTERRUPTED
    } else if err.chain().any(|e| e.is::<InputError>()) {
        exit::BAD_INPUT
    } else {
        exit::FAILED
    }
}

/// One line: the error and its causes joined by ": ", without line breaks.
pub fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}
