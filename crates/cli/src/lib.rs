//! What every phi-tune binary does alike. phi-train spells its flags as LLaMA-Factory does
//! (`--max_new_tokens`), the other binaries as clap does (`--max-new-tokens`); each accepts
//! both, so a flag copied from one command works in the next. Errors print as one line.

use clap::{ArgMatches, Command, Parser};
use std::ffi::OsString;

/// `cmd` with every long flag also accepted with `_` and `-` swapped.
pub fn both_spellings(cmd: Command) -> Command {
    cmd.mut_args(|a| {
        let Some(long) = a.get_long() else {
            return a;
        };
        let other = if long.contains('_') {
            long.replace('_', "-")
        } else {
            long.replace('-', "_")
        };
        if other == long {
            return a;
        }
        // clap keeps names as &'static str; a binary parses its flags once.
        a.alias(&*Box::leak(other.into_boxed_str()))
    })
}

/// The matches for `argv` under `A`'s command with both spellings; `--help` and usage
/// errors exit as clap's own parsing does.
pub fn matches<A: Parser, I, T>(argv: I) -> ArgMatches
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    try_matches::<A, _, _>(argv).unwrap_or_else(|e| e.exit())
}

/// As `matches`, with clap's error returned, for a binary that words some errors its own way.
pub fn try_matches<A: Parser, I, T>(argv: I) -> Result<ArgMatches, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    both_spellings(A::command()).try_get_matches_from(argv)
}

/// `A` from the process's arguments, either spelling.
pub fn parse<A: Parser>() -> A {
    let m = matches::<A, _, _>(std::env::args_os());
    A::from_arg_matches(&m).unwrap_or_else(|e| e.exit())
}

/// Runs a binary's body: an error prints as one line (its context chain joined with ": ")
/// and exits with status 1.
pub fn exit_on_error(result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(Parser, Debug)]
    struct Kebab {
        #[arg(long, default_value_t = 1)]
        max_new_tokens: usize,
        #[arg(long)]
        seed: Option<u64>,
    }

    #[derive(Parser, Debug)]
    #[command(rename_all = "snake_case")]
    struct Snake {
        #[arg(long, default_value_t = 1)]
        max_new_tokens: usize,
    }

    fn kebab(args: &[&str]) -> Kebab {
        let m = matches::<Kebab, _, _>(std::iter::once("x").chain(args.iter().copied()));
        Kebab::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn both_spellings_name_the_same_flag() {
        assert_eq!(kebab(&["--max-new-tokens", "7"]).max_new_tokens, 7);
        assert_eq!(kebab(&["--max_new_tokens", "8"]).max_new_tokens, 8);
        assert_eq!(kebab(&["--max_new_tokens=9"]).max_new_tokens, 9);
        assert_eq!(kebab(&["--seed", "3"]).seed, Some(3));
        let m = matches::<Snake, _, _>(["x", "--max-new-tokens", "5"]);
        assert_eq!(Snake::from_arg_matches(&m).unwrap().max_new_tokens, 5);
        // An unknown flag is still refused.
        assert!(both_spellings(Kebab::command())
            .try_get_matches_from(["x", "--max_new_token", "5"])
            .is_err());
    }
}
