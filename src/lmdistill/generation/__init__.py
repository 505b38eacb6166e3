"""The sequence engine: batched, cached, seeded generation for every on-policy method.

```python
from lmdistill.generation import SamplingConfig, generate
out = generate(student, prompts, policy="switch", teacher=teacher,
               config=SamplingConfig(max_new_tokens=128, seed=0), params={"tau0": 0.2},
               pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
```
Policies: ``student``, ``teacher``, ``mixed``, ``switch``, ``scrg``, ``teacher_mix`` (see ``policies/``).
"""

from lmdistill.generation.batch import CORRECTED, PADDING, STUDENT, TEACHER
from lmdistill.generation.config import SamplingConfig
from lmdistill.generation.engine import generate
from lmdistill.generation.noise import key_from
from lmdistill.generation.output import GenerationOutput
from lmdistill.generation.policies import POLICIES, Policy

__all__ = ["CORRECTED", "GenerationOutput", "PADDING", "POLICIES", "Policy", "STUDENT", "SamplingConfig", "TEACHER",
           "generate", "key_from"]
