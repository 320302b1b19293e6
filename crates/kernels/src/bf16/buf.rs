//! bf16 operands in 64-byte-aligned storage. An AMX tile load whose rows straddle cache lines
//! ran 6.5× slower than one of aligned rows (one core, rows in L1: 64 M against 420 M 1 KiB
//! tiles a second), and the heap hands out 16-byte-aligned blocks. So every packed operand
//! starts on a line of its own here, and each row of one (a multiple of 32 values) stays so.

use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};

/// `len` values from the first 64-byte boundary of a plain allocation 31 values longer: an
/// over-aligned allocation (`posix_memalign`) left the heap fragmented enough to raise a
/// step's peak RSS by a fifth.
pub struct Bf16Buf {
    data: Vec<MaybeUninit<u16>>,
    off: usize,
    len: usize,
}

impl Bf16Buf {
    fn alloc(len: usize) -> Bf16Buf {
        let mut data: Vec<MaybeUninit<u16>> = Vec::with_capacity(len + 31);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { data.set_len(len + 31) };
        let off = data.as_ptr().align_offset(64);
        assert!(off < 32, "a u16 allocation is 2-byte aligned");
        Bf16Buf { data, off, len }
    }

    pub fn zeroed(len: usize) -> Bf16Buf {
        let mut b = Bf16Buf::alloc(len);
        b.values().fill(MaybeUninit::new(0));
        b
    }

    /// A buffer of `len` values that `fill` writes, with no pass to zero it first.
    ///
    /// # Safety
    /// `fill` writes every one of the `len` values it is given.
    pub unsafe fn filled_by(len: usize, fill: impl FnOnce(&mut [MaybeUninit<u16>])) -> Bf16Buf {
        let mut b = Bf16Buf::alloc(len);
        fill(b.values());
        b
    }

    fn values(&mut self) -> &mut [MaybeUninit<u16>] {
        &mut self.data[self.off..self.off + self.len]
    }
}

impl Deref for Bf16Buf {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        let v = &self.data[self.off..self.off + self.len];
        // SAFETY: these values were written (`zeroed` or `filled_by`'s contract).
        unsafe { &*(v as *const [MaybeUninit<u16>] as *const [u16]) }
    }
}

impl DerefMut for Bf16Buf {
    fn deref_mut(&mut self) -> &mut [u16] {
        let v = self.values();
        // SAFETY: as `deref`.
        unsafe { &mut *(v as *mut [MaybeUninit<u16>] as *mut [u16]) }
    }
}

impl PartialEq for Bf16Buf {
    fn eq(&self, other: &Bf16Buf) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_buffer_starts_on_a_cache_line_and_keeps_its_values() {
        // Allocations of odd sizes in between shift where the heap's next block starts.
        let mut keep = Vec::new();
        for len in [0usize, 1, 31, 32, 33, 1000, 4096 + 7] {
            keep.push(vec![0u8; len % 97 + 1]);
            let z = Bf16Buf::zeroed(len);
            assert_eq!(z.as_ptr() as usize % 64, 0, "zeroed({len})");
            assert!(z.len() == len && z.iter().all(|&v| v == 0));
            // SAFETY: the closure writes all `len` values.
            let f = unsafe {
                Bf16Buf::filled_by(len, |v| {
                    for (i, x) in v.iter_mut().enumerate() {
                        x.write(i as u16);
                    }
                })
            };
            assert_eq!(f.as_ptr() as usize % 64, 0, "filled_by({len})");
            assert!(f.iter().enumerate().all(|(i, &v)| v == i as u16));
        }
    }
}
