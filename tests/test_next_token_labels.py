"""The next-token figure labels a newline token '\\n' (as the token figure shows it), not '\\\\n'."""

import numpy as np

from moe_lab import viz


class _Pieces:
    def pieces(self, ids):
        return [{13: "\\n", 5: "▁the", 7: "'"}[i] for i in ids]


def test_newline_label_has_one_backslash():
    p = np.zeros(20)
    p[[13, 5, 7]] = [0.5, 0.3, 0.2]
    fig = viz.next_token_figure(p, p, _Pieces(), top_n=3)
    labels = list(fig.data[0].y)
    assert labels[0] == "'\\n' (13)", labels
    assert "\\\\" not in "".join(labels)
    assert labels[1] == "'▁the' (5)"
