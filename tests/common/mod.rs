//! What the end-to-end tests share: an instance on a real socket, with (or
//! without) an in-process VMM connected to it.
#![allow(dead_code)]

pub mod daemon;
pub mod victim;

use std::path::Path;
use std::sync::Arc;

use wdvirt::accel::SharedAccelerator;
use wdvirt::daemon::instance::{Instance, InstanceSpec};
use wdvirt::vdev::wd::WdConfig;
use wdvirt::vmm::{GuestRam, LoopbackVmm};

/// Where the tests put guest RAM (above 4 GiB, as QEMU puts high RAM).
pub const RAM_BASE: u64 = 0x1_0000_0000;

/// An instance serving `dir/NAME.sock`.
pub fn instance(
    accel: &SharedAccelerator,
    dir: &Path,
    name: &str,
    pasid: u32,
    config: WdConfig,
) -> Instance {
    let spec = InstanceSpec {
        name: name.into(),
        socket: dir.join(format!("{name}.sock")),
        config,
        type_name: wdvirt::vdev::wd::DEFAULT_TYPE_NAME.into(),
    };
    Instance::start(spec, accel.clone(), pasid).unwrap()
}

/// An instance with a VMM connected and `ram_size` bytes of guest RAM mapped.
pub struct Rig {
    pub instance: Instance,
    pub vmm: Arc<LoopbackVmm>,
    _dir: tempfile::TempDir,
}

pub fn start(
    accel: &SharedAccelerator,
    name: &str,
    pasid: u32,
    config: WdConfig,
    ram_size: u64,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let instance = instance(accel, dir.path(), name, pasid, config);
    let ram = GuestRam::new(RAM_BASE, ram_size).unwrap();
    let vmm = Arc::new(LoopbackVmm::connect(instance.socket(), ram).unwrap());
    Rig {
        instance,
        vmm,
        _dir: dir,
    }
}

/// SIGTERM to a `wdvirt serve` or `wdvirt daemon` child, and its exit
/// status. One that hangs on the way out fails here, not at CI's time limit.
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("wdvirt did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Stops a `wdvirt daemon` child with SIGTERM and checks that it exited 0.
pub fn stop_daemon(child: &mut std::process::Child) {
    let status = terminate(child);
    assert!(status.success(), "wdvirt daemon failed: {status}");
}

/// Stops a `wdvirt serve --json` child with SIGTERM, checks that it exited 0,
/// and returns what it printed: one report per instance.
pub fn stop_serve(child: &mut std::process::Child) -> Vec<serde_json::Value> {
    use std::io::Read;
    let status = terminate(child);
    assert!(status.success(), "wdvirt serve failed: {status}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    match serde_json::from_str(&out) {
        Ok(serde_json::Value::Array(reports)) => reports,
        other => panic!("wdvirt serve --json printed {other:?}: {out}"),
    }
}

/// Decodes a whole `format` stream with flate2 (an implementation
/// independent of the device's); panics if flate2 refuses it.
pub fn flate2_decode(format: wdvirt_abi::Format, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    use wdvirt_abi::Format;
    let mut out = Vec::new();
    match format {
        Format::Deflate => flate2::read::DeflateDecoder::new(data).read_to_end(&mut out),
        Format::Zlib => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out),
        Format::Gzip => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
    }
    .expect("flate2 refuses the device's stream");
    out
}

/// Encodes `data` as one `format` stream with flate2 at zlib's default level.
pub fn flate2_encode(format: wdvirt_abi::Format, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use wdvirt_abi::Format;
    let lvl = flate2::Compression::new(6);
    match format {
        Format::Deflate => {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), lvl);
            e.write_all(data).and_then(|()| e.finish())
        }
        Format::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), lvl);
            e.write_all(data).and_then(|()| e.finish())
        }
        Format::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), lvl);
            e.write_all(data).and_then(|()| e.finish())
        }
    }
    .expect("flate2 encodes into memory")
}

/// Checks a guest tool's `stream-*` job report (`wdvirt_guest::workload`)
/// against the host, for the job's input `data`: the host cuts `data` into
/// the job's `piece_bytes` pieces and runs them through the engine's stream
/// code (`wdvirt::accel::stream::run`) at the job's level, which gives the
/// guest's compressed stream byte for byte (its SHA-256 and length match);
/// zlib (flate2) decodes that stream back to `data`; and the guest's SHA-256s
/// of its input and of what the device decompressed equal `data`'s.
pub fn assert_stream_job_matches_host(
    job: &serde_json::Value,
    format: wdvirt_abi::Format,
    data: &[u8],
) {
    use wdvirt::accel::{ops, stream};
    use wdvirt_abi::{Opcode, stream as s};

    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let sha = |b: &[u8]| {
        let mut d = [0u8; 32];
        ops::sha256(b, &mut d).unwrap();
        hex(&d)
    };
    let piece = job["piece_bytes"].as_u64().unwrap() as usize;
    let level = job["level"].as_u64().unwrap();
    let mut ctx = vec![0u8; s::CTX_SIZE as usize];
    let mut dst = vec![0u8; piece + piece / 8 + 256];
    let mut packed = Vec::with_capacity(data.len() / 2);
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![data]
    } else {
        data.chunks(piece).collect()
    };
    let last = pieces.len() - 1;
    for (i, p) in pieces.iter().enumerate() {
        let flush = if i == last {
            s::FLUSH_FINISH
        } else {
            s::FLUSH_SYNC
        };
        let start = if i == 0 { s::START } else { 0 };
        let param = format.code() | level << s::LEVEL_SHIFT | flush << s::FLUSH_SHIFT | start;
        let out = stream::run(Opcode::StreamCompress, p, &mut dst, &mut ctx, param).unwrap();
        packed.extend_from_slice(&dst[..out.bytes as usize]);
    }
    assert_eq!(job["pieces"], pieces.len(), "{job}");
    assert_eq!(job["compressed"], packed.len(), "compressed length: {job}");
    assert_eq!(
        job["stream_sha256"],
        sha(&packed),
        "the compressed stream: {job}"
    );
    let back = flate2_decode(format, &packed);
    assert!(back == data, "zlib decodes the guest's stream to its input");
    let want = sha(data);
    assert_eq!(job["input_sha256"], want, "the guest's input: {job}");
    assert_eq!(
        job["output_sha256"], want,
        "what the device decompressed: {job}"
    );
    assert_eq!(job["output_bytes"], data.len());
    assert_eq!(
        (
            &job["framing_ok"],
            &job["consumed_all"],
            &job["roundtrip_ok"],
            &job["ok"]
        ),
        (&true.into(), &true.into(), &true.into(), &true.into()),
        "{job}"
    );
}
