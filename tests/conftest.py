"""Every test runs on 16 simulated CPU devices (set before JAX's first use)."""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=16').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
