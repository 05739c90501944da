//! Argument parsing for the `wdvirt-guest` tool, by hand (the tool must stay
//! small and static). `cmdline` mode turns `wdvirt.KEY=VALUE` words of the
//! kernel command line into the same arguments: dotted kernel parameters are
//! not passed to init, so the tool reads `/proc/cmdline` itself.

use crate::workload::{JobKind, RunOptions};

pub const USAGE: &str = "\
usage: wdvirt-guest COMMAND [OPTIONS]
commands:
  probe                         find the device, print identity and BARs
  run --jobs LIST --size BYTES [--seed N] [--level L]
                                LIST: comma-separated deflate,zlib,gzip,crc32c,sha256,copy,fill,compare,
                                stream-deflate,stream-zlib,stream-gzip (one stream of any --size)
  garbage --count N [--seed S] [--widths 1,2,4] [--until stdin]
                                random BAR0 accesses, then the device's error registers;
                                --until stdin: after N, go on in rounds of 1000 until a line
                                arrives on standard input (in the test guest, the serial console)
  cmdline                       read wdvirt.mode=, wdvirt.jobs=, wdvirt.size=, wdvirt.seed=,
                                wdvirt.count=, ... from /proc/cmdline
common options:
  --bdf DDDD:BB:DD.F            use this device (default: the first wdvirt function)
  --queue Q  --depth D          queue to use (default 0) and its depth (default min(64, MAX_DEPTH))
  --hugepages N                 2 MiB hugepages for DMA memory (default 4)
  --timeout SECS                per-batch timeout (default 30)
BYTES accepts K, M suffixes (1024-based).";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Probe,
    Run(RunOptions),
    Garbage {
        count: u32,
        seed: u64,
        widths: Vec<u8>,
        /// Go on past `count` until a line arrives on standard input.
        until_stdin: bool,
    },
    Cmdline,
    Help,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolOptions {
    pub command: Command,
    pub bdf: Option<String>,
    pub queue: u32,
    /// 0: choose from the device's MAX_DEPTH.
    pub depth: u32,
    pub hugepages: u32,
    pub timeout_secs: u64,
}

/// `123`, `0x1000`, `64K`, `2M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("bad number {s:?}");
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1024u64),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    let n = match num.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).map_err(|_| bad())?,
        None => num.parse::<u64>().map_err(|_| bad())?,
    };
    n.checked_mul(mult).ok_or_else(bad)
}

fn num<T: TryFrom<u64>>(key: &str, v: &str) -> Result<T, String> {
    let n = parse_size(v).map_err(|e| format!("{key}: {e}"))?;
    T::try_from(n).map_err(|_| format!("{key}: {v} is out of range"))
}

pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<ToolOptions, String> {
    let mut it = args.into_iter();
    let cmd = it.next().unwrap_or_else(|| "help".into());
    let mut o = ToolOptions {
        command: Command::Help,
        bdf: None,
        queue: 0,
        depth: 0,
        hugepages: 4,
        timeout_secs: 30,
    };
    let (mut jobs, mut size, mut seed, mut level, mut count, mut widths) =
        (None, None, 1u64, 0u32, None, vec![4u8]);
    let mut until_stdin = false;
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            o.command = Command::Help;
            return Ok(o);
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--jobs" => jobs = Some(JobKind::parse_list(&value)?),
            "--size" => size = Some(num::<usize>(&flag, &value)?),
            "--seed" => seed = num(&flag, &value)?,
            "--level" => level = num(&flag, &value)?,
            "--count" => count = Some(num(&flag, &value)?),
            "--widths" => {
                widths = value
                    .split(',')
                    .map(|w| match w.trim() {
                        "1" => Ok(1),
                        "2" => Ok(2),
                        "4" => Ok(4),
                        other => Err(format!("--widths: {other:?} is not 1, 2 or 4")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--until" if value == "stdin" => until_stdin = true,
            "--until" => return Err(format!("--until: {value:?} is not stdin")),
            "--bdf" => o.bdf = Some(value),
            "--queue" => o.queue = num(&flag, &value)?,
            "--depth" => o.depth = num(&flag, &value)?,
            "--hugepages" => o.hugepages = num(&flag, &value)?,
            "--timeout" => o.timeout_secs = num(&flag, &value)?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    o.command = match cmd.as_str() {
        "probe" => Command::Probe,
        "run" => Command::Run(RunOptions {
            jobs: jobs.ok_or("run needs --jobs")?,
            size: size.ok_or("run needs --size")?,
            seed,
            level,
        }),
        "garbage" => Command::Garbage {
            count: count.ok_or("garbage needs --count")?,
            seed,
            widths,
            until_stdin,
        },
        "cmdline" => Command::Cmdline,
        "help" | "-h" | "--help" => Command::Help,
        other => return Err(format!("unknown command {other:?}")),
    };
    Ok(o)
}

/// Builds the tool's arguments from a kernel command line: `wdvirt.mode=M`
/// is the command (default `probe`), every other `wdvirt.KEY=VALUE` becomes
/// `--KEY VALUE`, except `wdvirt.shell=`, which is init's (a shell after
/// the tool, before power-off).
pub fn args_from_cmdline(cmdline: &str) -> Vec<String> {
    let mut mode = "probe".to_string();
    let mut rest = Vec::new();
    for word in cmdline.split_whitespace() {
        let Some(kv) = word.strip_prefix("wdvirt.") else {
            continue;
        };
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        if k == "mode" {
            mode = v.to_string();
        } else if k == "shell" {
            continue;
        } else {
            rest.push(format!("--{k}"));
            rest.push(v.to_string());
        }
    }
    let mut args = vec![mode];
    args.extend(rest);
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Format;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn sizes_take_suffixes_and_hex() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("2m").unwrap(), 2 << 20);
        assert_eq!(parse_size("0x10").unwrap(), 16);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999M").is_err());
    }

    #[test]
    fn stream_jobs_parse() {
        let o = parse_args(args("run --jobs stream-gzip,zlib --size 256M")).unwrap();
        assert!(matches!(
            o.command,
            Command::Run(RunOptions { ref jobs, size, .. })
                if jobs == &[JobKind::Stream(Format::Gzip), JobKind::Compress(Format::Zlib)]
                    && size == 256 << 20
        ));
        for name in JobKind::NAMES {
            assert_eq!(JobKind::parse(name).map(JobKind::name), Some(name));
        }
        assert!(parse_args(args("run --jobs stream-lz4 --size 1")).is_err());
    }

    #[test]
    fn run_parses_with_defaults() {
        let o = parse_args(args("run --jobs gzip,sha256 --size 1M --queue 1")).unwrap();
        assert_eq!(
            o.command,
            Command::Run(RunOptions {
                jobs: vec![JobKind::Compress(Format::Gzip), JobKind::Sha256],
                size: 1 << 20,
                seed: 1,
                level: 0
            })
        );
        assert_eq!((o.queue, o.depth, o.hugepages), (1, 0, 4));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(
            parse_args(args("run --size 10"))
                .unwrap_err()
                .contains("--jobs")
        );
        assert!(
            parse_args(args("run --jobs crc32c --size"))
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse_args(args("probe --frobnicate 1"))
                .unwrap_err()
                .contains("--frobnicate")
        );
        assert!(parse_args(args("fly")).unwrap_err().contains("fly"));
        assert!(
            parse_args(args("garbage --count 5 --widths 3"))
                .unwrap_err()
                .contains("3")
        );
        assert!(parse_args(args("run --jobs crc32c --size 10 --queue 99999999999")).is_err());
    }

    #[test]
    fn garbage_and_help() {
        let o = parse_args(args("garbage --count 100 --seed 9 --widths 1,4")).unwrap();
        assert_eq!(
            o.command,
            Command::Garbage {
                count: 100,
                seed: 9,
                widths: vec![1, 4],
                until_stdin: false,
            }
        );
        let o = parse_args(args_from_cmdline(
            "wdvirt.mode=garbage wdvirt.count=7 wdvirt.until=stdin",
        ))
        .unwrap();
        assert!(matches!(
            o.command,
            Command::Garbage {
                count: 7,
                until_stdin: true,
                ..
            }
        ));
        assert!(
            parse_args(args("garbage --count 7 --until tea"))
                .unwrap_err()
                .contains("\"tea\" is not stdin")
        );
        assert_eq!(parse_args(Vec::new()).unwrap().command, Command::Help);
        assert_eq!(
            parse_args(args("run --help")).unwrap().command,
            Command::Help
        );
    }

    #[test]
    fn kernel_cmdline_becomes_arguments() {
        let line = "console=ttyS0 wdvirt.mode=run wdvirt.jobs=deflate,crc32c wdvirt.size=64K quiet wdvirt.bogus";
        let a = args_from_cmdline(line);
        assert_eq!(a, args("run --jobs deflate,crc32c --size 64K"));
        let o = parse_args(a).unwrap();
        assert!(matches!(
            o.command,
            Command::Run(RunOptions { size: 65536, .. })
        ));
        assert_eq!(args_from_cmdline("root=/dev/vda"), args("probe"));
        assert_eq!(
            args_from_cmdline("wdvirt.mode=run wdvirt.shell=1 wdvirt.size=1M"),
            args("run --size 1M"),
            "shell= is init's, not the tool's"
        );
    }
}
