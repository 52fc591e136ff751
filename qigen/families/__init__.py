"""The kernel families, one module each, registered best first: `activations="auto"` takes the first whose rules a
format meets. Adding a family is its module, its templates and one line here."""
from qigen.families import wq_a8, wq_f32
from qigen.spec import FAMILIES

for _family in (wq_a8.FAMILY, wq_f32.FAMILY):
    FAMILIES[_family.name] = _family
