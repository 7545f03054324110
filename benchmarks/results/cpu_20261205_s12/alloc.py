"""Per-layer CDF allocation for the gate from a one-layer-at-a-time KL measurement (cost ~ miss^2)."""
import json, sys
sens = json.load(open(sys.argv[1]))
cur = json.load(open('/tmp/s12/curves.json'))
grid = sorted(float(c) for c in cur['sparsity'])
C0 = sens[0]['cdf']
a = {r['layer']: r['kl'] for r in sens}
def kl(l, c):
    return a[l] * (cur['miss'][str(c)][l] / cur['miss'][str(C0)][l]) ** 2
def sp(l, c):
    return cur['sparsity'][str(c)][l]
L = len(sens)
def uniform(c):
    return sum(kl(l, c) for l in range(L)), sum(sp(l, c) for l in range(L)) / L
for c in (0.97, 0.96, 0.95, 0.94, 0.93):
    print('uniform', c, 'pred KL %.5f sparsity %.4f' % uniform(c))
best = []
lam = 1.0
out = []
for lam in [10 ** (x / 8) for x in range(0, 48)]:
    ch = {l: max(grid, key=lambda c: sp(l, c) / L - lam * kl(l, c)) for l in range(L)}
    tk = sum(kl(l, ch[l]) for l in range(L)); ts = sum(sp(l, ch[l]) for l in range(L)) / L
    out.append((lam, tk, ts, ch))
for lam, tk, ts, ch in out[::3]:
    print('lam %.3g pred KL %.5f sparsity %.4f' % (lam, tk, ts), [ch[l] for l in range(L)])
json.dump([{"lam": lam, "kl": tk, "sparsity": ts, "cdf": [ch[l] for l in range(L)]} for lam, tk, ts, ch in out], open('/tmp/s12/alloc.json', 'w'))
