//! The residual connection.

// ANCHOR: residual
/// out [N] = a [N] + b [N]
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// The sum passes its gradient to both inputs unchanged: da += dout, db += dout.
pub fn residual_backward(da: &mut [f32], db: &mut [f32], dout: &[f32]) {
    for ((a, b), d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
        *a += d;
        *b += d;
    }
}
// ANCHOR_END: residual

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_adds_and_backward_copies() {
        let mut out = [0.0; 2];
        residual_forward(&mut out, &[1., 2.], &[10., 20.]);
        assert_eq!(out, [11., 22.]);
        let (mut da, mut db) = ([1.0, 1.0], [0.0, 0.0]);
        residual_backward(&mut da, &mut db, &[3., 4.]);
        assert_eq!((da, db), ([4., 5.], [3., 4.]));
    }
}
