//! The commands: orchestration only. The work lives in plan, execute, ops and the readers.

pub mod apply;
pub mod convert;
pub mod inspect;
pub mod verify;

use crate::cli::{Cli, Command, InspectCommand};
use crate::error::Result;
use crate::plan::Direction;

pub fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Merge(a) => apply::run(Direction::Merge, &a.base, &a.adapters, &a.out, &a.opts, cli.quiet),
        Command::Unmerge(a) => apply::run(Direction::Unmerge, &a.merged, &a.adapters, &a.out, &a.opts, cli.quiet),
        Command::Inspect(InspectCommand::Adapter(a)) => inspect::adapter(a),
        Command::Convert(a) => convert::run(a, cli.quiet),
        Command::Verify(a) => verify::run(a, cli.quiet),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "bone-tool", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}
