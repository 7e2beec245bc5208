// SPDX-License-Identifier: Apache-2.0
//! What the build script renders for packages: man pages from the clap
//! definitions, shell completions, and the config file's page and default
//! file from the commented example (`config::EXAMPLE`). Shared by build.rs
//! and a unit test of the library, which checks that the pages build.rs
//! wrote are the ones the daemon's own `Cli::command()` gives.

use std::io;

use clap::Command;
use clap_complete::Shell;

/// The section of the daemon's pages: system administration.
pub const SECTION: &str = "8";

/// One man page per command: `vhost-rng.8`, `vhost-rng-serve.8`,
/// `vhost-rng-guest-add.8`, ... Hidden commands get none. `root` must
/// have been built (`Command::build`) so that subcommands know their
/// `bin_name`.
pub fn man_pages(root: &Command, version: &'static str) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    add_pages(root, root.get_name().to_owned(), version, &mut pages)?;
    Ok(pages)
}

fn add_pages(
    cmd: &Command,
    page_name: String,
    version: &'static str,
    pages: &mut Vec<(String, Vec<u8>)>,
) -> io::Result<()> {
    let page = cmd.clone().display_name(page_name.clone()).version(version);
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .title(page_name.to_uppercase())
        .section(SECTION)
        // The version without the commit, which the VERSION section has:
        // the footer has little room.
        .source(format!(
            "vhost-rng {}",
            version.split(' ').next().unwrap_or(version)
        ))
        .manual("System Manager's Manual")
        .render(&mut out)?;
    pages.push((format!("{page_name}.{SECTION}"), out));
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        add_pages(
            sub,
            format!("{page_name}-{}", sub.get_name()),
            version,
            pages,
        )?;
    }
    Ok(())
}

/// Completion scripts for bash, zsh and fish, each with the path it is
/// installed at (relative to /).
pub fn completions(root: &Command) -> Vec<(&'static str, Vec<u8>)> {
    let name = root.get_name().to_owned();
    [
        (
            Shell::Bash,
            "usr/share/bash-completion/completions/vhost-rng",
        ),
        (Shell::Zsh, "usr/share/zsh/vendor-completions/_vhost-rng"),
        (
            Shell::Fish,
            "usr/share/fish/vendor_completions.d/vhost-rng.fish",
        ),
    ]
    .into_iter()
    .map(|(shell, path)| {
        let mut cmd = root.clone();
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
        (path, out)
    })
    .collect()
}

/// The commented example file (`pub const EXAMPLE: &str = r#"..."#;`) in
/// the text of src/config/mod.rs.
pub fn example_in(mod_rs: &str) -> Option<&str> {
    const START: &str = "pub const EXAMPLE: &str = r#\"";
    let from = mod_rs.find(START)? + START.len();
    let len = mod_rs[from..].find("\"#;")?;
    Some(&mod_rs[from..from + len])
}

/// The file installed as /etc/vhost-rng/config.toml: the example with
/// every setting commented out, and `guest = []`, so that the daemon
/// accepts it and serves no guest until it is edited.
pub fn default_config(example: &str) -> String {
    let mut out = String::from(
        "# /etc/vhost-rng/config.toml: the configuration of `vhost-rng serve`, read at\n\
         # start and on `systemctl reload vhost-rng`; every key is described in\n\
         # vhost-rng.toml(5). As installed it serves no guest: every setting below\n\
         # is commented out. Check an edited file with\n\
         #   vhost-rng serve --config /etc/vhost-rng/config.toml --check-config\n\
         \n\
         # No guests, on purpose. Delete this line when you add [[guest]] tables;\n\
         # guests can also be added to a running daemon with `vhost-rng guest add`\n\
         # (their sockets in a directory the vhost-rng user may write: socket-dirs).\n\
         guest = []\n\
         \n",
    );
    for line in example.lines() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            out.push_str(line);
        } else {
            out.push('#');
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// One key of the example: its name, its example value and the comment
/// lines that explain it.
struct Key {
    name: String,
    value: String,
    about: Vec<String>,
}

/// The part of the example a key is in.
struct Part {
    heading: String,
    intro: Vec<String>,
    keys: Vec<Key>,
}

/// Splits the example into the top level, `[defaults]` and `[[guest]]`;
/// each key takes the comment lines right above it and after it on its
/// line. In `[[guest]]` only the comment block (the keys' list) is kept:
/// the tables after it are examples, shown whole in EXAMPLE.
fn parts(example: &str) -> Vec<Part> {
    let mut parts = vec![Part {
        heading: "TOP-LEVEL KEYS".into(),
        intro: Vec::new(),
        keys: Vec::new(),
    }];
    let mut comments: Vec<String> = Vec::new();
    let mut in_guest_examples = false;
    for line in example.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix('#') {
            comments.push(comment.trim().to_owned());
            continue;
        }
        if line.is_empty() {
            let only_top = parts.len() == 1;
            if let Some(part) = parts.last_mut()
                && part.keys.is_empty()
                && !comments.is_empty()
                && only_top
            {
                part.intro.append(&mut comments);
            }
            comments.clear();
            continue;
        }
        if line.starts_with('[') {
            let table = line.split('#').next().unwrap_or(line).trim();
            if table == "[[guest]]" {
                if !in_guest_examples {
                    parts.push(Part {
                        heading: "[[guest]] TABLES".into(),
                        intro: std::mem::take(&mut comments),
                        keys: Vec::new(),
                    });
                }
                in_guest_examples = true;
            } else {
                parts.push(Part {
                    heading: format!("{table} TABLE"),
                    intro: std::mem::take(&mut comments),
                    keys: Vec::new(),
                });
            }
            comments.clear();
            continue;
        }
        if in_guest_examples {
            comments.clear();
            continue;
        }
        let Some((name, rest)) = line.split_once('=') else {
            comments.clear();
            continue;
        };
        let (value, trailing) = match rest.find("  #") {
            Some(at) => (
                &rest[..at],
                Some(rest[at..].trim().trim_start_matches('#').trim()),
            ),
            None => (rest, None),
        };
        let mut about = std::mem::take(&mut comments);
        if let Some(trailing) = trailing {
            about.push(format!("({trailing})"));
        }
        if let Some(part) = parts.last_mut() {
            part.keys.push(Key {
                name: name.trim().to_owned(),
                value: value.trim().to_owned(),
                about,
            });
        }
    }
    parts
}

/// Text made safe for roff: backslashes doubled, a leading dot or quote
/// escaped.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

/// vhost-rng.toml(5), from the commented example.
pub fn config_page(example: &str, version: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH VHOST-RNG.TOML 5 \"\" \"vhost-rng {}\" \"File Formats Manual\"\n",
        roff(version)
    ));
    out.push_str(".SH NAME\nvhost\\-rng.toml \\- configuration file of vhost\\-rng serve\n");
    out.push_str(".SH SYNOPSIS\n/etc/vhost\\-rng/config.toml\n");
    out.push_str(
        ".SH DESCRIPTION\n\
         The TOML file given to \\fBvhost\\-rng serve \\-\\-config\\fR \\fIFILE\\fR \
         (the packaged service reads /etc/vhost\\-rng/config.toml). It is read whole \
         and checked before it is used, at start and again on SIGHUP \
         (\\fBsystemctl reload vhost\\-rng\\fR); a file with a mistake is refused with \
         the line and key at fault, and on reload the daemon goes on with the \
         configuration it had. Options given on the command line take precedence over \
         the file. Unknown keys are errors. \\fBvhost\\-rng serve \\-\\-config\\fR \
         \\fIFILE\\fR \\fB\\-\\-check\\-config\\fR checks a file without starting anything.\n\
         .PP\n\
         A file meant to have no guests says so with \\fBguest = []\\fR; a reload of a \
         file with neither that nor a [[guest]] table is refused.\n",
    );
    for part in parts(example) {
        out.push_str(&format!(".SH \"{}\"\n", roff(&part.heading)));
        if !part.intro.is_empty() {
            let preformatted = part.intro.iter().any(|l| l.contains("  "));
            if preformatted {
                out.push_str(".nf\n");
                for line in &part.intro {
                    out.push_str(&roff(line));
                    out.push('\n');
                }
                out.push_str(".fi\n");
            } else {
                out.push_str(&roff(&part.intro.join(" ")));
                out.push('\n');
            }
        }
        for key in &part.keys {
            out.push_str(&format!(
                ".TP\n\\fB{}\\fR = \\fI{}\\fR\n{}\n",
                roff(&key.name),
                roff(&key.value),
                roff(&key.about.join(" "))
            ));
        }
    }
    out.push_str(".SH EXAMPLE\n.nf\n");
    for line in example.lines() {
        out.push_str(&roff(line));
        out.push('\n');
    }
    out.push_str(".fi\n");
    out.push_str(
        ".SH FILES\n/etc/vhost\\-rng/config.toml\n\
         .SH \"SEE ALSO\"\n\\fBvhost\\-rng\\fR(8), \\fBvhost\\-rng\\-serve\\fR(8)\n",
    );
    out
}
