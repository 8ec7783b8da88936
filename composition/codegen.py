"""The ``code_generation`` block of a content config: how to ask a model for code.

```yaml
id: python-function
generator: code_generation
output_format: code
template: "Write a Python function {{ name }} that {{ task }}."   # the prompt (sandboxed jinja2)
code_generation:
  model: claude-sonnet-4-5
  language: python             # code is taken from the reply's ```python blocks
  system_prompt: You write small, tested Python functions.
  max_tokens: 2048
  temperature: 0.2
  stop_sequences: []
  timeout_s: 60
```
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_STOP_SEQUENCES = 16


class CodeGenerationSpec(BaseModel):
    """Validated with the config file: a typo or an out-of-range value is CONFIG_INVALID."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$", max_length=128)]
    # The language of the fenced blocks to keep (```python); case does not matter, common aliases do (py).
    language: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_+#.-]*$", max_length=32)]
    system_prompt: Annotated[str, StringConstraints(max_length=100_000)] = ""
    max_tokens: int = Field(4096, ge=1, le=128_000)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    stop_sequences: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )
    # How long one call may take before it counts as UPSTREAM_TIMEOUT.
    timeout_s: float = Field(60.0, gt=0, le=600)
