//! Token + position embedding (the "encoder" of llm.c).

// ANCHOR: embedding_forward
/// tokens [B, T] (ids < V), wte [Vp, C], wpe [maxT, C] -> out [B, T, C]:
///   out[b, t] = wte[tokens[b, t]] + wpe[t]
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t_len: usize, c: usize) {
    for (i, (row, &tok)) in out.chunks_exact_mut(c).zip(tokens).enumerate() {
        let t = i % t_len;
        let tok = tok as usize;
        for ((o, e), p) in row.iter_mut().zip(&wte[tok * c..(tok + 1) * c]).zip(&wpe[t * c..(t + 1) * c]) {
            *o = e + p;
        }
    }
}
// ANCHOR_END: embedding_forward

// ANCHOR: embedding_backward
/// A lookup's gradient is a scatter-add: dwte[tokens[b, t]] += dout[b, t], dwpe[t] += dout[b, t].
/// Serial on purpose: two positions may hold the same token, and a fixed order keeps the sum
/// deterministic.
pub fn embedding_backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], t_len: usize, c: usize) {
    for (i, (row, &tok)) in dout.chunks_exact(c).zip(tokens).enumerate() {
        let t = i % t_len;
        let tok = tok as usize;
        for (g, d) in dwte[tok * c..(tok + 1) * c].iter_mut().zip(row) {
            *g += d;
        }
        for (g, d) in dwpe[t * c..(t + 1) * c].iter_mut().zip(row) {
            *g += d;
        }
    }
}
// ANCHOR_END: embedding_backward

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::finite_difference::{check_gradient, random};

    #[test]
    fn forward_looks_up_and_adds() {
        let wte = [1., 1., 2., 2., 3., 3.]; // 3 tokens, C = 2
        let wpe = [0.1, 0.2, 0.3, 0.4]; // 2 positions
        let mut out = [0.0; 4];
        embedding_forward(&mut out, &[2, 0], &wte, &wpe, 2, 2);
        assert_eq!(out, [3.1, 3.2, 1.3, 1.4]);
    }

    #[test]
    fn backward_matches_finite_differences_with_repeated_tokens() {
        let (v, t_len, c) = (5, 3, 4);
        let tokens = [1u32, 3, 1, 4, 1, 0]; // B = 2; token 1 appears three times
        let wte = random(v * c, 1);
        let wpe = random(t_len * c, 2);
        let dout = random(tokens.len() * c, 3);
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t_len * c]);
        embedding_backward(&mut dwte, &mut dwpe, &dout, &tokens, t_len, c);
        let forward = |wte: &[f32], wpe: &[f32]| {
            let mut out = vec![0.0; tokens.len() * c];
            embedding_forward(&mut out, &tokens, wte, wpe, t_len, c);
            out
        };
        check_gradient(&wte, &dwte, &dout, |w| forward(w, &wpe));
        check_gradient(&wpe, &dwpe, &dout, |p| forward(&wte, p));
    }
}
