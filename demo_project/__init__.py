"""Demo: forward-KL vs reverse-KL training of a Gaussian mixture, watched by KLMonitor."""
