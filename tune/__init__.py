"""Ray Tune glue for `icm-ray tune` (installed as `icm_ray_tune`): the search space, the
objectives, the trainable and the experiment. The search itself lives in icm_ray."""
