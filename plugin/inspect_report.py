"""The `prunequant inspect` report: a dict for --json and a readable text rendering of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from graph_passes.channel_groups import ChannelAnalysis


@dataclass
class InspectReport:
    model: str
    opset: int
    inputs: dict[str, list[int]]
    normalisation: dict
    analysis: ChannelAnalysis
    bridge: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        a = self.analysis
        layers = [
            {
                "name": layer.name, "op_type": layer.op_type, "in_channels": layer.in_channels,
                "out_channels": layer.out_channels, "kernel": layer.kernel, "groups": layer.groups,
                "params": layer.params, "macs": layer.macs, "weight": layer.weight,
                "output_groups": layer.output_groups, "input_groups": layer.input_groups,
                "prunable_out_channels": layer.prunable_out_channels,
            }
            for layer in a.layers
        ]
        groups = [
            {
                "id": g.id, "size": g.size, "prunable": g.prunable, "kind": g.kind, "reasons": g.reasons,
                "inexact": g.inexact,
                "producers": g.producers, "consumers": g.consumers,
                "members": [m.summary() for m in g.members],
            }
            for g in a.groups
        ]
        sites = [
            {"tensor": s.tensor, "consumers": s.consumers, "shape": s.shape, "non_negative": s.non_negative}
            for s in a.sites
        ]
        return {
            "model": self.model,
            "opset": self.opset,
            "inputs": self.inputs,
            "normalisation": self.normalisation,
            "totals": {
                "weight_layers": len(a.layers),
                "params": sum(layer.params for layer in a.layers),
                "macs": sum(layer.macs for layer in a.layers),
                "groups": len(a.groups),
                "prunable_groups": len(a.prunable_groups),
                "prunable_share": round(a.prunable_share, 6),
                # weight-layer output channels in prunable exact groups / with the inexact groups
                "exact_share": round(a.coverage(False), 6),
                "inexact_share": round(a.coverage(True), 6),
                "inexact_hidden_width": a.inexact_hidden_width,
                "inexact_groups": sum(not g.exact for g in a.groups),
                "conv_prunable_share": round(a.conv_prunable_share(), 6),
            },
            "unknown_ops": a.unknown_ops,
            "layers": layers,
            "groups": groups,
            "activation_sites": sites,
            "bridge": self.bridge,
            **self.extra,
        }

    def to_text(self, max_rows: int = 60) -> str:
        d = self.to_dict()
        t = d["totals"]
        lines = [
            f"model      {d['model']}  (opset {d['opset']})",
            "inputs     " + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in d["inputs"].items()),
            f"normalised {self._normalisation_line()}",
            f"layers     {t['weight_layers']} weight layers, {t['params']:,} params, {t['macs']:,} MACs",
            f"groups     {t['groups']} channel groups, {t['prunable_groups']} prunable; "
            f"{100 * t['prunable_share']:.1f}% of weight-layer output channels prunable "
            f"({100 * t['conv_prunable_share']:.1f}% of conv output channels)",
        ]
        if t["inexact_groups"]:
            on = "on" if t["inexact_hidden_width"] else "off: pass --inexact-hidden-width to prune them"
            lines.append(f"coverage   {100 * t['exact_share']:.1f}% in exact groups; "
                         f"{100 * t['inexact_share']:.1f}% with the {t['inexact_groups']} inexact group(s) "
                         f"(residual hidden width through LayerNorm/RMSNorm; {on})")
        if d["unknown_ops"]:
            lines.append("no rule    " + ", ".join(f"{k} x{v}" for k, v in sorted(d["unknown_ops"].items()))
                         + "  (these block the channels they touch)")
        if self.bridge is not None:
            lines.append(f"bridge     {self._bridge_line()}")
        lines += ["", "Weight layers", _table(
            ["layer", "op", "in", "out", "kernel", "groups", "params", "MACs", "group"],
            [[r["name"], r["op_type"], r["in_channels"], r["out_channels"], "x".join(map(str, r["kernel"])) or "-",
              r["groups"], f"{r['params']:,}", f"{r['macs']:,}", ",".join(r["output_groups"])]
             for r in d["layers"]], max_rows)]
        lines += ["", "Channel groups", _table(
            ["group", "channels", "prunable", "kind", "producers", "consumers", "why not / why inexact"],
            [[g["id"], g["size"], "yes" if g["prunable"] else "no", g["kind"], len(g["producers"]),
              len(g["consumers"]), g["reasons"][0] if g["reasons"] else (g["inexact"][0] if g["inexact"] else "")]
             for g in d["groups"]], max_rows)]
        return "\n".join(lines)

    def _normalisation_line(self) -> str:
        n = self.normalisation
        err = n.get("max_rel_error")
        err_text = f"verified with onnxruntime, max rel error {err:.1e}" if err is not None else "not verified"
        line = f"{n.get('nodes_before', '?')} -> {n.get('nodes_after', '?')} nodes; {err_text}"
        return f"{line}; {n['dequantized']}" if n.get("dequantized") else line

    def _bridge_line(self) -> str:
        b = self.bridge or {}
        if b.get("ok"):
            return f"trainable through the torch bridge, parity max rel error {b.get('max_rel_error', 0):.1e}"
        return f"NOT trainable: {b.get('error', 'unknown error')}"


def _table(header: list[str], rows: list[list], max_rows: int) -> str:
    shown = rows[:max_rows]
    cells = [header] + [[str(c) for c in r] for r in shown]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    if len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more (use --json for all)")
    return "\n".join(out)
