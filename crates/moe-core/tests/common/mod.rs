//! Independent f64 re-implementations used as oracles by the integration tests.
#![allow(dead_code)]

use moe_core::config::{GroupMaskValue, MoeConfig, RoutingConfig, V2TopkMethod};

pub fn topk64(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    // stable sort by value descending keeps lower indices first among ties
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap());
    idx.truncate(k);
    idx
}

pub fn softmax64(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

pub fn sig64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Routing of one row in f64: ids and weights.
pub fn reference64(c: &MoeConfig, row: &[f64], bias: &[f64]) -> (Vec<usize>, Vec<f64>) {
    let (e, k) = (c.num_experts, c.top_k);
    match c.routing {
        RoutingConfig::SoftmaxTopk { renormalize } => {
            let p = softmax64(row);
            let ids = topk64(&p, k);
            let mut w: Vec<f64> = ids.iter().map(|&i| p[i]).collect();
            if renormalize {
                let s: f64 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= s);
            }
            (ids, w)
        }
        RoutingConfig::DeepseekV3 { n_group, topk_group, norm_topk_prob, routed_scaling_factor, group_mask } => {
            let s: Vec<f64> = row.iter().map(|&x| sig64(x)).collect();
            let cb: Vec<f64> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
            let g = e / n_group;
            let gs: Vec<f64> = (0..n_group)
                .map(|gi| {
                    let t = topk64(&cb[gi * g..(gi + 1) * g], 2);
                    cb[gi * g + t[0]] + cb[gi * g + t[1]]
                })
                .collect();
            let kept = topk64(&gs, topk_group);
            let fill = if group_mask == GroupMaskValue::Zero { 0.0 } else { f64::NEG_INFINITY };
            let masked: Vec<f64> = (0..e).map(|i| if kept.contains(&(i / g)) { cb[i] } else { fill }).collect();
            let ids = topk64(&masked, k);
            let mut w: Vec<f64> = ids.iter().map(|&i| s[i]).collect();
            if norm_topk_prob {
                let sum: f64 = w.iter().sum::<f64>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= sum);
            }
            w.iter_mut().for_each(|x| *x *= routed_scaling_factor as f64);
            (ids, w)
        }
        RoutingConfig::DeepseekV2 { method, norm_topk_prob, routed_scaling_factor } => {
            let p = softmax64(row);
            let ids = match method {
                V2TopkMethod::Greedy => topk64(&p, k),
                V2TopkMethod::GroupLimitedGreedy { n_group, topk_group } => {
                    let g = e / n_group;
                    let gm: Vec<f64> = (0..n_group)
                        .map(|gi| p[gi * g..(gi + 1) * g].iter().cloned().fold(f64::MIN, f64::max))
                        .collect();
                    let kept = topk64(&gm, topk_group);
                    let masked: Vec<f64> = (0..e).map(|i| if kept.contains(&(i / g)) { p[i] } else { 0.0 }).collect();
                    topk64(&masked, k)
                }
            };
            let mut w: Vec<f64> = ids.iter().map(|&i| p[i]).collect();
            if k > 1 && norm_topk_prob {
                let s: f64 = w.iter().sum::<f64>() + 1e-20;
                w.iter_mut().for_each(|x| *x /= s);
            } else {
                w.iter_mut().for_each(|x| *x *= routed_scaling_factor as f64);
            }
            (ids, w)
        }
        RoutingConfig::GptOss => {
            let ids = topk64(row, k);
            let v: Vec<f64> = ids.iter().map(|&i| row[i]).collect();
            (ids, softmax64(&v))
        }
        RoutingConfig::Llama4 => {
            let ids = topk64(row, k);
            let w = ids.iter().map(|&i| sig64(row[i])).collect();
            (ids, w)
        }
    }
}

fn act64(a: moe_core::Activation, g: f64, u: f64) -> f64 {
    match a {
        moe_core::Activation::Swiglu => g * sig64(g) * u,
        moe_core::Activation::GptOssSwiglu { alpha, limit } => {
            let (alpha, limit) = (alpha as f64, limit as f64);
            let g = g.min(limit);
            let u = u.clamp(-limit, limit);
            (u + 1.0) * g * sig64(alpha * g)
        }
        moe_core::Activation::GeluTanhGlu => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * g * (1.0 + (c * (g + 0.044715 * g * g * g)).tanh()) * u
        }
    }
}

fn matvec64(w: &[f32], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    (0..rows).map(|r| w[r * cols..(r + 1) * cols].iter().zip(x).map(|(a, b)| *a as f64 * b).sum()).collect()
}

#[allow(clippy::too_many_arguments)]
fn mlp64(
    a: moe_core::Activation,
    inter: usize,
    hidden: usize,
    w13: &[f32],
    w2: &[f32],
    b13: Option<&[f32]>,
    b2: Option<&[f32]>,
    x: &[f64],
) -> Vec<f64> {
    let mut gu = matvec64(w13, x, 2 * inter);
    if let Some(b) = b13 {
        gu.iter_mut().zip(b).for_each(|(g, b)| *g += *b as f64);
    }
    let act: Vec<f64> = (0..inter).map(|j| act64(a, gu[j], gu[inter + j])).collect();
    let mut y = matvec64(w2, &act, hidden);
    if let Some(b) = b2 {
        y.iter_mut().zip(b).for_each(|(o, b)| *o += *b as f64);
    }
    y
}

/// The whole block, token by token, in f64, from unquantized weights. Returns `[T, H]`.
pub fn naive_block64(c: &MoeConfig, w: &moe_core::MoeWeights, hidden: &[f32]) -> Vec<f64> {
    let (e, h, i) = (c.num_experts, c.hidden_size, c.intermediate_size);
    let t = hidden.len() / h;
    let rw = w.router.weight.to_f32_vec().unwrap();
    let rb = w.router.bias.as_ref().map(|b| b.to_f32_vec().unwrap());
    let cb: Vec<f64> = w
        .router
        .correction_bias
        .as_ref()
        .map(|b| b.to_f32_vec().unwrap().iter().map(|&x| x as f64).collect())
        .unwrap_or_else(|| vec![0.0; e]);
    let w13 = w.experts.w13.part("weight").unwrap().to_f32_vec().unwrap();
    let w2 = w.experts.w2.part("weight").unwrap().to_f32_vec().unwrap();
    let b13 = w.experts.b13.as_ref().map(|b| b.to_f32_vec().unwrap());
    let b2 = w.experts.b2.as_ref().map(|b| b.to_f32_vec().unwrap());
    let on_input = matches!(c.routing, RoutingConfig::Llama4);
    let mut out = vec![0.0f64; t * h];
    for tok in 0..t {
        let x: Vec<f64> = hidden[tok * h..(tok + 1) * h].iter().map(|&v| v as f64).collect();
        let mut logits = matvec64(&rw, &x, e);
        if let Some(b) = &rb {
            logits.iter_mut().zip(b).for_each(|(l, b)| *l += *b as f64);
        }
        // Routing sees f32 logits in the runtime; round them the same way so ids agree.
        let logits: Vec<f64> = logits.iter().map(|&l| l as f32 as f64).collect();
        let (ids, ws) = reference64(c, &logits, &cb);
        let o = &mut out[tok * h..(tok + 1) * h];
        for (&id, &wt) in ids.iter().zip(&ws) {
            let xin: Vec<f64> = if on_input { x.iter().map(|v| v * wt).collect() } else { x.clone() };
            let y = mlp64(
                c.activation,
                i,
                h,
                &w13[id * 2 * i * h..(id + 1) * 2 * i * h],
                &w2[id * h * i..(id + 1) * h * i],
                b13.as_ref().map(|b| &b[id * 2 * i..(id + 1) * 2 * i]),
                b2.as_ref().map(|b| &b[id * h..(id + 1) * h]),
                &xin,
            );
            let scale = if on_input { 1.0 } else { wt };
            o.iter_mut().zip(&y).for_each(|(a, b)| *a += scale * b);
        }
        if let (Some(s), Some(sc)) = (&w.shared, c.shared_expert) {
            // The shared expert uses the block's activation, without biases.
            let y = mlp64(
                c.activation,
                sc.intermediate_size,
                h,
                &s.w13.to_f32_vec().unwrap(),
                &s.w2.to_f32_vec().unwrap(),
                None,
                None,
                &x,
            );
            let g = s
                .gate
                .as_ref()
                .map_or(1.0, |g| sig64(g.to_f32_vec().unwrap().iter().zip(&x).map(|(a, b)| *a as f64 * b).sum()));
            o.iter_mut().zip(&y).for_each(|(a, b)| *a += g * b);
        }
    }
    out
}

/// Relative L2 of an f32 output against an f64 oracle.
pub fn rel_l2_64(out: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let mut num = 0.0;
    let mut den = 0.0;
    for (&a, &b) in out.iter().zip(reference) {
        assert!(a.is_finite(), "non-finite output");
        num += (a as f64 - b).powi(2);
        den += b * b;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
