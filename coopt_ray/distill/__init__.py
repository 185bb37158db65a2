"""Dataset distillation stages: KRR-ST on the optimized set (krr_st.py: the math and the Ray Train loop;
stage.py: ``coopt distill``)."""
