//! `cvm-measure generate-assets` (hidden): the man pages and shell completions that
//! `make install` installs, generated from the clap definition so they never drift from it.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

use super::{work, Failure};

/// Write man pages (OUT/man) and bash, zsh and fish completions (OUT/completions)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The output directory
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// cvm-init takes no options beyond these two (it is PID 1); its page says where its
/// configuration comes from.
fn cvm_init_command() -> clap::Command {
    clap::Command::new("cvm-init")
        .version(cvm_measure::VERSION)
        .about("PID 1 of a confidential Kubernetes node")
        .long_about(
            "cvm-init is the first process of a confidential VM (SEV-SNP or TDX) booted from \
             the initramfs of a measured unified kernel image. It measures what it uses before \
             using it, opens or creates the encrypted state disk with a key sealed to the \
             measurements or released by a key broker, mounts the verity-protected root, \
             starts and supervises the node's services, and never exits.\n\n\
             Its configuration comes from the kernel command line (cvm.* options, listed by \
             --help) and from /etc/cvm-init/config.toml inside the measured image. Run as \
             anything but PID 1 it only answers --version and --help.\n\n\
             cvm-measure(1) predicts the registers a node reaches and verifies its evidence.",
        )
        .disable_version_flag(true)
        .disable_help_flag(true)
        .arg(
            clap::Arg::new("version")
                .short('V')
                .long("version")
                .action(clap::ArgAction::Version)
                .help("Print the version"),
        )
        .arg(
            clap::Arg::new("help")
                .short('h')
                .long("help")
                .action(clap::ArgAction::Help)
                .help("Print the kernel command line options"),
        )
}

/// The definition without the hidden subcommands (this one), which completions would list.
fn visible() -> clap::Command {
    let full = super::command();
    clap::Command::new("cvm-measure")
        .version(cvm_measure::VERSION)
        .about(full.get_about().cloned().unwrap_or_default())
        .long_about(full.get_long_about().cloned().unwrap_or_default())
        .subcommand_required(true)
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

fn write_man(dir: &Path, cmd: clap::Command, section: &str) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut bytes = Vec::new();
    clap_mangen::Man::new(cmd)
        .section(section)
        .render(&mut bytes)?;
    std::fs::write(dir.join(format!("{name}.{section}")), bytes)
}

/// The page of each subcommand, named `cvm-measure-<words>.1` as git's are.
fn write_subcommand_pages(dir: &Path, cmd: &clap::Command, prefix: &str) -> std::io::Result<()> {
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("{prefix}-{}", sub.get_name());
        write_man(dir, sub.clone().name(name.clone()), "1")?;
        write_subcommand_pages(dir, sub, &name)?;
    }
    Ok(())
}

pub fn run(args: Args) -> Result<(), Failure> {
    let fail = |e: std::io::Error| work(format!("cannot write to {}: {e}", args.out.display()));
    let man = args.out.join("man");
    let completions = args.out.join("completions");
    std::fs::create_dir_all(&man).map_err(fail)?;
    std::fs::create_dir_all(&completions).map_err(fail)?;
    let mut cmd = visible();
    cmd.build();
    write_man(&man, cmd.clone(), "1").map_err(fail)?;
    write_subcommand_pages(&man, &cmd, "cvm-measure").map_err(fail)?;
    write_man(&man, cvm_init_command(), "8").map_err(fail)?;
    for shell in [Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "cvm-measure", &completions).map_err(fail)?;
    }
    std::fs::write(
        completions.join("cvm-measure.bash"),
        bash_completion(&mut cmd),
    )
    .map_err(fail)?;
    Ok(())
}

/// The bash completion. clap_complete 4.6 spells the state of a subcommand of a hyphenated
/// binary two ways (`cvm__measure__subcmd__snp` in the loop that finds it,
/// `cvm__subcmd__measure__subcmd__snp` in the arms that complete it: clap issues 6421 and
/// 6529), so nothing past the subcommand would complete; the arms are respelled as the loop
/// spells them (a no-op once clap_complete agrees with itself).
fn bash_completion(cmd: &mut clap::Command) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(Shell::Bash, cmd, "cvm-measure", &mut script);
    String::from_utf8_lossy(&script)
        .replace("cvm__subcmd__measure", "cvm__measure")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_name_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        run(Args {
            out: dir.path().to_path_buf(),
        })
        .unwrap();
        let man = std::fs::read_to_string(dir.path().join("man/cvm-measure.1")).unwrap();
        assert!(man.contains("kbs\\-serve"), "{man}");
        let page =
            std::fs::read_to_string(dir.path().join("man/cvm-measure-verify-tdx-quote.1")).unwrap();
        assert!(page.contains("qe\\-min\\-isvsvn"), "{page}");
        assert!(dir.path().join("man/cvm-init.8").is_file());
        let bash =
            std::fs::read_to_string(dir.path().join("completions/cvm-measure.bash")).unwrap();
        assert!(bash.contains("--vcpu-type") && bash.contains("snp-report"));
        assert!(dir.path().join("completions/_cvm-measure").is_file());
        let fish =
            std::fs::read_to_string(dir.path().join("completions/cvm-measure.fish")).unwrap();
        assert!(fish.contains("max-sessions"));
        assert!(!bash.contains("generate-assets"));
    }

    /// What bash offers after `cvm-measure <words> <current>`, the script sourced.
    fn bash_offers(script: &Path, words: &[&str], current: &str) -> String {
        let line = format!(
            "source {}; COMP_WORDS=(cvm-measure {} {current:?}); COMP_CWORD={}; \
             _cvm__measure cvm-measure {current:?} {:?}; echo \"${{COMPREPLY[*]}}\"",
            script.display(),
            words.join(" "),
            words.len() + 1,
            words.last().copied().unwrap_or("cvm-measure"),
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(line)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn bash_completes_subcommands_and_their_options() {
        let dir = tempfile::tempdir().unwrap();
        run(Args {
            out: dir.path().to_path_buf(),
        })
        .unwrap();
        let script = dir.path().join("completions/cvm-measure.bash");
        assert!(bash_offers(&script, &[], "ver").contains("verify"));
        assert!(bash_offers(&script, &["verify"], "").contains("tdx-quote"));
        let options = bash_offers(&script, &["kbs-serve"], "--max");
        assert!(
            options.contains("--max-sessions") && options.contains("--max-connections"),
            "{options}"
        );
        let options = bash_offers(&script, &["verify", "tdx-quote"], "--mr");
        assert!(options.contains("--mrownerconfig"), "{options}");
    }
}
