//! Cache-line-aligned scratch buffers for activations.
//!
//! The kernels read activations one 64-byte vector at a time, at multiples of 64 bytes from the row start.
//! From a `Vec` (16-byte aligned from the allocator) three loads in four straddle two cache lines, and a
//! split load costs a second load-port cycle: ~10 % of a compute-bound sparse kernel on AMD Zen 5.

use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

/// One cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Element types for which every bit pattern, all zeros included, is a valid value.
pub trait Plain: Copy + private::Sealed {}
impl Plain for i8 {}
impl Plain for u8 {}
impl Plain for i32 {}
impl Plain for f32 {}
mod private {
    pub trait Sealed {}
    impl Sealed for i8 {}
    impl Sealed for u8 {}
    impl Sealed for i32 {}
    impl Sealed for f32 {}
}

/// A zero-initialised slice of `len` values that starts on a 64-byte boundary.
pub struct Aligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len.checked_mul(size_of::<T>()).expect("buffer size overflows usize");
        Aligned { lines: vec![Line([0; 64]); bytes.div_ceil(64)], len, _t: PhantomData }
    }

    /// No values (the pointer is still aligned).
    pub fn empty() -> Self {
        Self::zeroed(0)
    }
}

impl<T: Plain> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least len·size_of::<T>() initialised bytes, aligned to 64 (≥ align_of T),
        // and every bit pattern is a valid T (Plain).
        unsafe { core::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and the borrow of self is exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_cache_line_and_holds_zeros() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut a = Aligned::<f32>::zeroed(len);
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0.0));
            a.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            assert!(a.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
        assert_eq!(Aligned::<i8>::empty().as_ptr() as usize % 64, 0);
    }
}
