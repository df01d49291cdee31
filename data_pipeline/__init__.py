"""Curation: readers, quality filters, deduplication, accounting, as datatrove PipelineSteps driven by YAML
recipes (`kiln data run recipes/data/<recipe>.yaml`)."""
