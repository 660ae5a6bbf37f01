"""The browser playground: steer the ego digit with the arrow keys while the world model dreams the next
frames live, one at a time; a local web server (`mnist-world play`) and the page it serves.
"""
