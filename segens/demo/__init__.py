"""Guided runs on synthetic data: ``ens demo`` (the whole workflow) and ``ens selfcheck`` (the conventions end to
end). Both are orchestrations of the library's own functions; the demo's members are YAML specs under
``segens/demo/members/``, read by the same loader as users' specs."""
