"""Shared test configuration: hypothesis profiles.

``ci`` (used when the CI environment variable is set): derandomized, so a CI run is reproducible; no deadline
(CPU timing on a shared 2-core machine is noisy). ``dev``: random exploration, fewer examples.
Select explicitly with ``pytest --hypothesis-profile=dev``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
