//! The commands: orchestration only. The work lives in plan, execute, ops and the readers.

pub mod apply;
pub mod convert;
pub mod inspect;
pub mod verify;

use crate::adapter::Adapter;
use crate::cli::{Cli, Command, InspectCommand};
use crate::error::input;
use crate::error::Result;
use crate::plan::Direction;
use std::path::{Path, PathBuf};

/// The base of merge or verify: --base when given, else the base the adapters record
/// (base_model_name_or_path), found as PEFT's AutoPeftModel finds it: a local folder (relative to
/// the working folder) or a model in the local Hugging Face cache. Every adapter must record the
/// same one.
fn base_or_recorded<'a>(
    base: Option<&Path>,
    adapters: impl IntoIterator<Item = &'a PathBuf>,
    prefix: &str,
    quiet: bool,
) -> Result<PathBuf> {
    if let Some(b) = base {
        return Ok(b.to_path_buf());
    }
    let mut named: Vec<(String, PathBuf)> = Vec::new();
    for path in adapters {
        let a = Adapter::open(path, prefix)?;
        let Some(base) = a.config.base_model_name_or_path.clone().filter(|b| !b.is_empty()) else {
            return Err(input(format!(
                "{}: no --base given, and its adapter_config.json records no base_model_name_or_path: pass --base MODEL",
                a.dir.display()
            )));
        };
        named.push((base, a.dir));
    }
    let (first, first_dir) = named.first().cloned().expect("clap requires an adapter");
    if let Some((other, dir)) = named.iter().find(|(b, _)| *b != first) {
        return Err(input(format!(
            "no --base given, and the adapters record different bases: {} {first:?}, {} {other:?}: pass --base MODEL",
            first_dir.display(),
            dir.display()
        )));
    }
    let Some(found) = crate::hub::recorded_base(&first, quiet)? else {
        return Err(input(format!(
            "{}: no --base given, and its base_model_name_or_path {first:?} is not a folder{}{}: pass --base MODEL",
            first_dir.display(),
            match std::env::current_dir() {
                Ok(cwd) if Path::new(&first).is_relative() => format!(" in {}", cwd.display()),
                _ => String::new(),
            },
            crate::model::hub_id_hint(Path::new(&first))
        )));
    };
    if found == Path::new(&first) && !quiet {
        eprintln!("{}: {first}", crate::hub::RECORDED_BASE);
    }
    Ok(found)
}

/// Replace every input given as a Hugging Face Hub id (`org/name[@revision]`, not a path that
/// exists) by its snapshot folder in the local cache, when the cache has it, and every cache
/// repository folder (`models--org--name`) by its snapshot ([`crate::hub::resolve`]).
fn find_hub_ids(command: &mut Command, quiet: bool) -> Result<()> {
    let mut inputs: Vec<(&str, &mut PathBuf)> = Vec::new();
    match command {
        Command::Merge(a) => {
            inputs.extend(a.base.iter_mut().map(|p| ("base", p)));
            // --each's adapters are found once their outputs are named after them (below)
            inputs.extend(a.adapters.iter_mut().map(|p| ("adapter", p)));
        }
        Command::Unmerge(a) => {
            inputs.push(("merged model", &mut a.merged));
            inputs.extend(a.adapters.iter_mut().map(|p| ("adapter", p)));
        }
        Command::Inspect(InspectCommand::Adapter(a)) => {
            inputs.push(("adapter", a.adapter.path_mut()));
            inputs.extend(a.base.iter_mut().map(|p| ("base", p)));
        }
        Command::Verify(a) => {
            inputs.extend(a.base.iter_mut().map(|p| ("base", p)));
            inputs.push(("merged model", &mut a.merged));
            inputs.extend(a.adapters.iter_mut().map(|p| ("adapter", p)));
        }
        Command::Convert(a) => {
            inputs.push(("adapter", a.adapter.path_mut()));
            inputs.extend(a.base.iter_mut().map(|p| ("base", p)));
        }
        Command::Completions { .. } | Command::Man => {}
    }
    for (what, path) in inputs {
        *path = crate::hub::resolve(path, what, quiet)?;
    }
    Ok(())
}

pub fn run(cli: &mut Cli) -> Result<()> {
    find_hub_ids(&mut cli.command, cli.quiet)?;
    match &cli.command {
        Command::Merge(a) => {
            let jobs = match (&a.out, &a.out_pattern) {
                (Some(out), _) => vec![apply::Job { adapters: a.adapters.clone(), out: out.clone() }],
                (None, Some(pattern)) => {
                    let mut jobs = apply::each(&a.each, pattern)?;
                    for path in jobs.iter_mut().flat_map(|j| j.adapters.iter_mut()) {
                        *path = crate::hub::resolve(path, "adapter", cli.quiet)?;
                    }
                    jobs
                }
                (None, None) => unreachable!("clap requires --out or --each with --out-pattern"),
            };
            let adapters = jobs.iter().flat_map(|j| &j.adapters);
            let base = base_or_recorded(a.base.as_deref(), adapters, &a.opts.prefix.adapter_prefix, cli.quiet)?;
            apply::run(Direction::Merge, &base, &jobs, &a.opts, cli.quiet)
        }
        Command::Unmerge(a) => {
            let jobs = vec![apply::Job { adapters: a.adapters.clone(), out: a.out.clone() }];
            apply::run(Direction::Unmerge, &a.merged, &jobs, &a.opts, cli.quiet)
        }
        Command::Inspect(InspectCommand::Adapter(a)) => inspect::adapter(a),
        Command::Convert(a) => convert::run(a, cli.quiet),
        Command::Verify(a) => {
            let base = base_or_recorded(a.base.as_deref(), &a.adapters, &a.prefix.adapter_prefix, cli.quiet)?;
            verify::run(a, &base, cli.quiet)
        }
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
