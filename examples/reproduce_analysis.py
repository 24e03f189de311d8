def analyse(*a, **k): return {"headline": {}}
