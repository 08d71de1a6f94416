//! Object names. A volume name becomes an NBD export name and part of file names on every
//! node, so names are restricted to a safe alphabet and a bounded length.

use thiserror::Error;

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name '{name}' is longer than {MAX_NAME_LEN} bytes")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name '{name}' may contain only letters, digits, '-', '_' and '.', and must start with a letter or digit"
    )]
    BadCharacters { kind: &'static str, name: String },
}

/// Checks a name of the given kind ("volume", "node", "pool").
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            name: name.to_string(),
        });
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !first_ok || !rest_ok {
        return Err(NameError::BadCharacters {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["demo", "vm-101-disk-0", "a", "x.y_z", "0abc"] {
            assert_eq!(validate_name("volume", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_dangerous_names() {
        for n in [
            "",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "-x",
            "ä",
            "a\0b",
            &"x".repeat(64),
        ] {
            assert!(validate_name("volume", n).is_err(), "{n:?}");
        }
    }
}
