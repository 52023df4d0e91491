"""Integrations with other libraries. Each lives in its own module and imports its library there, so
`import pydpm` never imports them:

    from pydpm.integrations.diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler, DDIMScheduler
"""
