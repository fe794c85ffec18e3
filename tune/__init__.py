"""Ray Tune glue (installed as `icm_ray_tune`). The tuning experiment is not built yet."""
