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
        Command::Merge(a) => {
            let jobs = match (&a.out, &a.out_pattern) {
                (Some(out), _) => vec![apply::Job { adapters: a.adapters.clone(), out: out.clone() }],
                (None, Some(pattern)) => apply::each(&a.each, pattern)?,
                (None, None) => unreachable!("clap requires --out or --each with --out-pattern"),
            };
            apply::run(Direction::Merge, &a.base, &jobs, &a.opts, cli.quiet)
        }
        Command::Unmerge(a) => {
            let jobs = vec![apply::Job { adapters: a.adapters.clone(), out: a.out.clone() }];
            apply::run(Direction::Unmerge, &a.merged, &jobs, &a.opts, cli.quiet)
        }
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
