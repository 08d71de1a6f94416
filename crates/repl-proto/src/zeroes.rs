//! The process-wide buffer of zeros that marks a write as a zero-write.
//!
//! A `Write` whose data is a slice of this buffer ([`zeroes`]) says "these bytes read as
//! zeros; the replica may deallocate them": the encoder sends it as a `WriteZeroes` frame
//! without the data (version 8), and a driver applies it by punching a hole instead of
//! writing zeros. Any other all-zero buffer is an ordinary write (it stays allocated). The
//! test is by address ([`is_zeroes`]), so it costs nothing per write and survives the
//! cheap clones and slices of `Bytes`.

use std::sync::OnceLock;

use bytes::Bytes;

/// The longest zero-write one message carries (callers split larger ranges).
pub const MAX_ZEROES: usize = 1 << 20;

fn buffer() -> &'static Bytes {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    ZEROS.get_or_init(|| Bytes::from(vec![0u8; MAX_ZEROES]))
}

/// A zero-write of `len` bytes (`None` above [`MAX_ZEROES`]).
pub fn zeroes(len: usize) -> Option<Bytes> {
    (len <= MAX_ZEROES).then(|| buffer().slice(..len))
}

/// Whether `data` is a zero-write made by [`zeroes`] (an empty buffer is not).
pub fn is_zeroes(data: &Bytes) -> bool {
    let base = buffer().as_ptr() as usize;
    let start = data.as_ptr() as usize;
    !data.is_empty() && start >= base && start + data.len() <= base + MAX_ZEROES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slices_of_the_shared_buffer_are_zero_writes() {
        let z = zeroes(8192).unwrap();
        assert!(z.iter().all(|b| *b == 0));
        assert!(is_zeroes(&z));
        assert!(is_zeroes(&z.slice(4096..)));
        assert!(is_zeroes(&z.clone()));
        assert!(
            !is_zeroes(&Bytes::from(vec![0u8; 8192])),
            "an ordinary buffer of zeros"
        );
        assert!(!is_zeroes(&Bytes::new()));
        assert!(!is_zeroes(&z.slice(0..0)));
        assert!(zeroes(MAX_ZEROES).is_some());
        assert!(zeroes(MAX_ZEROES + 1).is_none());
    }
}
