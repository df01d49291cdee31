"""The TextWorld agent environment: offline games by seed and kind (`games`), a thin gym wrapper with a per-step
timeout (`env`), the ReAct step format and the one prompt builder shared by data generation and evaluation
(`prompt`), expert / random / model policies (`policies`), expert trajectories as AgentInstruct-style ShareGPT
records (`trajectories`), and agent evaluation (`evaluate`). `kiln agent gen` and `kiln agent eval` are in
`cli`, which imports none of textworld, torch or datatrove at import time."""
