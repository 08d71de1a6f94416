//! The cluster secret file: 32 random bytes from the OS, written as 64 hex digits and a
//! newline, file mode 0600. An agent keeps it in its state directory; every node of a cluster
//! must hold the same bytes.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tandem_repl_proto::ClusterSecret;

/// Bytes of a generated secret.
pub const SECRET_LEN: usize = 32;
/// Shortest secret a file may hold (the protocol's minimum).
pub const MIN_SECRET_LEN: usize = 16;

/// Why a secret file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cluster secret file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cluster secret file {path} is readable by group or others (mode {mode:o}); run chmod 600"
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("cluster secret file {path} does not hold hex digits: {detail}")]
    NotHex { path: PathBuf, detail: String },
    #[error("cluster secret file {path} holds {len} bytes, at least {MIN_SECRET_LEN} are required")]
    TooShort { path: PathBuf, len: usize },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// `n` bytes from the operating system's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(b)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd number of digits ({})", s.len()));
    }
    let digit = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("unexpected character {:?}", c as char)),
        }
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Creates `path` with a new random secret (mode 0600, fsynced). Fails if the file exists:
/// a secret is never overwritten by accident.
pub fn generate_secret_file(path: &Path) -> Result<ClusterSecret, SecretError> {
    let bytes = random_bytes::<SECRET_LEN>().map_err(SecretError::Random)?;
    let io_err = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    // The umask cannot widen 0600, but make sure anyway.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err)?;
    f.write_all(format!("{}\n", hex(&bytes)).as_bytes())
        .map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    secret(bytes.to_vec(), path)
}

/// Reads a secret file: hex digits (surrounding whitespace ignored), at least 16 bytes, not
/// readable by group or others.
pub fn load_secret_file(path: &Path) -> Result<ClusterSecret, SecretError> {
    let io_err = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io_err)?;
    let bytes = unhex(text.trim()).map_err(|detail| SecretError::NotHex {
        path: path.to_path_buf(),
        detail,
    })?;
    secret(bytes, path)
}

/// Loads `path`, or generates it when it does not exist.
pub fn load_or_generate_secret_file(path: &Path) -> Result<ClusterSecret, SecretError> {
    match generate_secret_file(path) {
        Err(SecretError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            load_secret_file(path)
        }
        other => other,
    }
}

fn secret(bytes: Vec<u8>, path: &Path) -> Result<ClusterSecret, SecretError> {
    let len = bytes.len();
    if len < MIN_SECRET_LEN {
        return Err(SecretError::TooShort {
            path: path.to_path_buf(),
            len,
        });
    }
    ClusterSecret::new(bytes).map_err(|_| SecretError::TooShort {
        path: path.to_path_buf(),
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.secret");
        let a = generate_secret_file(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(text.len(), 65, "64 hex digits and a newline: {text:?}");
        assert_eq!(load_secret_file(&p).unwrap(), a);
        assert_eq!(load_or_generate_secret_file(&p).unwrap(), a);
        // Never overwritten.
        assert!(generate_secret_file(&p).is_err());
        // Two generated secrets differ.
        let q = dir.path().join("other.secret");
        assert_ne!(load_or_generate_secret_file(&q).unwrap(), a);
    }

    #[test]
    fn bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let p = write("open", &"ab".repeat(32), 0o644);
        assert!(matches!(
            load_secret_file(&p),
            Err(SecretError::InsecurePermissions { mode: 0o644, .. })
        ));
        let p = write("short", &"ab".repeat(15), 0o600);
        assert!(matches!(
            load_secret_file(&p),
            Err(SecretError::TooShort { len: 15, .. })
        ));
        let p = write("nothex", &"zz".repeat(32), 0o600);
        assert!(matches!(
            load_secret_file(&p),
            Err(SecretError::NotHex { .. })
        ));
        let p = write("odd", "abc", 0o600);
        assert!(matches!(
            load_secret_file(&p),
            Err(SecretError::NotHex { .. })
        ));
        let p = write("ok", &format!("  {}\n\n", "0A".repeat(16)), 0o400);
        load_secret_file(&p).unwrap();
        assert!(matches!(
            load_secret_file(&dir.path().join("missing")),
            Err(SecretError::Io { .. })
        ));
    }

    #[test]
    fn hex_round_trip() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&b)).unwrap(), b);
    }
}
