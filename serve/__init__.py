"""Ray Serve glue (installed as `icm_ray_serve`): the steering API app in app.py."""
