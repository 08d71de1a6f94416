//! GPT GUIDs: 16 bytes on disk, the first three fields little endian.

use std::fmt;

use serde::{Serialize, Serializer};

/// A GUID as stored in a GPT header or entry. Displays as sgdisk prints it
/// (`0FC63DAF-8483-4772-8E79-3D69D8477DE4`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the textual form (case-insensitive, with dashes). Returns `None` on anything else.
    pub fn parse(s: &str) -> Option<Guid> {
        let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
        if hex.len() != 32 || s.len() != 36 {
            return None;
        }
        let mut text = [0u8; 16];
        for (i, out) in text.iter_mut().enumerate() {
            let hi = (hex[2 * i] as char).to_digit(16)?;
            let lo = (hex[2 * i + 1] as char).to_digit(16)?;
            *out = (hi * 16 + lo) as u8;
        }
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&[text[3], text[2], text[1], text[0]]);
        b[4..6].copy_from_slice(&[text[5], text[4]]);
        b[6..8].copy_from_slice(&[text[7], text[6]]);
        b[8..16].copy_from_slice(&text[8..16]);
        Some(Guid(b))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..16] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl Serialize for Guid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let text = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
        let g = Guid::parse(text).unwrap();
        assert_eq!(g.0[0], 0xAF);
        assert_eq!(g.to_string(), text);
        assert_eq!(Guid::parse(&text.to_lowercase()), Some(g));
        assert_eq!(Guid::parse("nope"), None);
    }
}
