"""Realistic, seeded demo data: a fictional retailer's customers over twelve months.

The mesh is only convincing on data that is as messy as production: visitors who browse
anonymously for weeks before signing up, several devices per person, a family sharing a
tablet, a CRM full of nicknames and typos whose records share no key with the web data, a
Christmas peak, customers drifting away. This package makes such data from a seed, with the
ground truth that real data never has, so that identity resolution, churn and lead models can
be measured and not just shown.

``profilemesh generate`` (:mod:`.command`) and :func:`generate` write a folder of files in the
formats the source connectors read; :func:`load_truth` reads its ground truth back.
"""

from profilemesh.services.generator.dataset import GeneratedData, generate, import_recipes
from profilemesh.services.generator.truth import Truth, load_truth

__all__ = ["GeneratedData", "Truth", "generate", "import_recipes", "load_truth"]
