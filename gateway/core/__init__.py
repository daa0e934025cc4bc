"""Domain core: recipes, resources, service state. No HTTP, no slurmrestd shapes."""
